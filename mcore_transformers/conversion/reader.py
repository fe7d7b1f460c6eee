"""Read an HF safetensors checkpoint by byte range: each rank touches only the slices it owns."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Open every shard of a folder once; serve whole tensors (mapped, zero-copy) or slices.

    `bytes_read` counts the bytes of the tensors and slices handed out, so a benchmark can show
    how much of the checkpoint each rank touched.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self._files: dict[str, object] = {}
        self._stack = ExitStack()
        self._where = self._locate_tensors()
        self.bytes_read = 0

    def _locate_tensors(self) -> dict[str, str]:
        index_path = os.path.join(self.folder, INDEX_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(
                    f"{index_path} is not a valid safetensors index ({err}). Re-download or re-save the checkpoint."
                ) from None
            for shard in sorted(set(weight_map.values())):
                self._open(shard, index_path)
            return dict(weight_map)
        if os.path.exists(os.path.join(self.folder, SINGLE_FILE)):
            handle = self._open(SINGLE_FILE, None)
            return {name: SINGLE_FILE for name in handle.keys()}
        found = sorted(os.listdir(self.folder))
        raise CheckpointError(
            f"No safetensors weights in {self.folder}: expected {SINGLE_FILE} or {INDEX_FILE}, found {found[:12]}. "
            "Only safetensors checkpoints are read; convert .bin files with transformers "
            "(AutoModelForCausalLM.from_pretrained(...).save_pretrained(...)) first."
        )

    def _open(self, shard: str, index_path: Optional[str]):
        path = os.path.join(self.folder, shard)
        if not os.path.exists(path):
            raise CheckpointError(
                f"{index_path} names the shard {shard}, which is missing from {self.folder}. "
                "The download is incomplete: fetch the missing file again."
            )
        try:
            handle = self._stack.enter_context(safe_open(path, framework="pt"))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"Cannot read {path}: {err}. The file is truncated or corrupt: download it again."
            ) from None
        self._files[shard] = handle
        return handle

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _handle(self, name: str):
        try:
            return self._files[self._where[name]]
        except KeyError:
            raise CheckpointError(f"Tensor {name!r} is not in the checkpoint at {self.folder}.") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._handle(name).get_slice(name).get_dtype()]

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The whole tensor (zero-copy mapping) or `[start:stop]` along `dim` (reads only those bytes)."""
        handle = self._handle(name)
        if dim is None:
            tensor = handle.get_tensor(name)
        else:
            index = [slice(None)] * dim + [slice(start, stop)]
            tensor = handle.get_slice(name)[tuple(index)]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
