"""Read an HF safetensors checkpoint by byte range: each rank touches only the slices it owns."""

from __future__ import annotations

import json
import math
import os
import struct
from contextlib import ExitStack
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(variant: Optional[str] = None) -> tuple[str, str]:
    """(single file, index file) of a checkpoint; a variant is named as transformers names it (model.fp16.safetensors)."""
    if not variant:
        return SINGLE_FILE, INDEX_FILE
    return f"model.{variant}.safetensors", f"model.safetensors.index.{variant}.json"


class CheckpointReader:
    """Open every shard of a folder once; serve whole tensors (mapped, zero-copy) or slices.

    `bytes_read` counts the bytes of the tensors and slices handed out, so a benchmark can show
    how much of the checkpoint each rank touched.
    """

    def __init__(self, folder: str, variant: Optional[str] = None):
        self.folder = folder
        self.variant = variant
        self._files: dict[str, object] = {}
        self._stack = ExitStack()
        self._where = self._locate_tensors()
        self.bytes_read = 0
        self._offsets: Optional[dict[str, tuple[int, int]]] = None  # name -> data bytes [begin, end) in its file
        self._maps: dict[str, torch.UntypedStorage] = {}  # shard -> copy-on-write mapping of the whole file
        self._fds: dict[str, int] = {}

    def _locate_tensors(self) -> dict[str, str]:
        single_file, index_file = weight_files(self.variant)
        index_path = os.path.join(self.folder, index_file)
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
        if os.path.exists(os.path.join(self.folder, single_file)):
            handle = self._open(single_file, None)
            return {name: single_file for name in handle.keys()}
        found = sorted(os.listdir(self.folder))
        raise CheckpointError(
            f"No safetensors weights in {self.folder}: expected {single_file} or {index_file}, found {found[:12]}. "
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
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._maps.clear()  # tensors made from a mapping keep it alive
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
        """The whole tensor, or `[start:stop]` along `dim`. Whole tensors and slices of the first non-trivial
        dim are zero-copy views of the file mapping (pages read when touched); a slice of a later dim is read
        with pread straight into a new tensor (whole rows of at most SLICE_BLOCK_BYTES at a time when the
        slice is narrow), so no page of the other ranks' columns is mapped in: a rank's memory holds its
        shards and little else."""
        shape, dtype = self.shape(name), self.dtype(name)
        stop = shape[dim] if dim is not None and stop is None else stop
        if dim is None or (start == 0 and stop == shape[dim]):
            tensor = self._handle(name).get_tensor(name)
            self.bytes_read += tensor.numel() * tensor.element_size()
            return tensor
        outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:]) * dtype.itemsize
        shard, begin = self._where[name], self._data_offsets()[name][0]
        if outer == 1:  # one contiguous run: a view of the mapping
            self.bytes_read += (stop - start) * inner
            span = self._mapping(shard)[begin + start * inner : begin + stop * inner]
            return torch.empty(0, dtype=dtype).set_(span, 0, (*shape[:dim], stop - start, *shape[dim + 1:]))
        out = torch.empty((*shape[:dim], stop - start, *shape[dim + 1:]), dtype=dtype)
        self.bytes_read += out.numel() * out.element_size()
        if out.numel() == 0:
            return out
        target = memoryview(out.view(-1).view(torch.uint8).numpy())
        row, piece = shape[dim] * inner, (stop - start) * inner  # bytes of one outer index, and of its slice
        if outer == 1 or piece >= SLICE_BLOCK_BYTES // 4:  # long runs: one pread per outer index
            for index in range(outer):
                self._pread(shard, target[index * piece : (index + 1) * piece], begin + index * row + start * inner)
            return out
        # short runs: whole outer rows a block at a time through one buffer, the slice copied out
        per_block = min(outer, max(1, SLICE_BLOCK_BYTES // row))
        block = torch.empty(per_block * row, dtype=torch.uint8)
        rows_out = out.view(-1).view(torch.uint8).view(outer, piece)
        for first in range(0, outer, per_block):
            count = min(per_block, outer - first)
            self._pread(shard, memoryview(block.numpy())[: count * row], begin + first * row)
            rows_out[first : first + count].copy_(block[: count * row].view(count, row)[:, start * inner : stop * inner])
        return out

    def _pread(self, shard: str, buffer: memoryview, offset: int) -> None:
        """Fill `buffer` from `shard` at `offset` (pread may return less than asked)."""
        done, size = 0, len(buffer)
        while done < size:
            got = os.preadv(self._fd(shard), [buffer[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{os.path.join(self.folder, shard)} ended early: the file is truncated.")
            done += got

    def read_rows(self, pieces: Sequence[tuple[str, int, int]]) -> torch.Tensor:
        """Rows [start:stop) along dim 0 of each (name, start, stop), concatenated along dim 0.

        When the pieces lie back to back in one file (HF writes gate_proj right before up_proj, so
        the fused [gate; up] at tp=1) the result is a view of the file mapping: no copy, pages read
        when touched. Otherwise each piece is read with pread straight into its place in one new
        tensor: one copy, no page faults on a fresh mapping, no intermediate tensors.
        """
        dtype, rest = self.dtype(pieces[0][0]), self.shape(pieces[0][0])[1:]
        row_bytes = math.prod(rest) * dtype.itemsize
        spans = []  # (shard, first byte, end byte)
        for name, start, stop in pieces:
            if self.dtype(name) != dtype or self.shape(name)[1:] != rest:
                raise CheckpointError(f"{name} and {pieces[0][0]} differ in dtype or trailing shape: they cannot be fused.")
            begin = self._data_offsets()[name][0]
            spans.append((self._where[name], begin + start * row_bytes, begin + stop * row_bytes))
        rows = sum(stop - start for _, start, stop in pieces)
        self.bytes_read += rows * row_bytes
        if all(b[0] == a[0] and b[1] == a[2] for a, b in zip(spans, spans[1:])):
            span = self._mapping(spans[0][0])[spans[0][1] : spans[-1][2]]  # a storage of just this span
            return torch.empty(0, dtype=dtype).set_(span, 0, (rows, *rest))
        out = torch.empty((rows, *rest), dtype=dtype)
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        pos = 0
        for shard, begin, end in spans:
            self._pread(shard, buffer[pos : pos + end - begin], begin)
            pos += end - begin
        return out

    def _data_offsets(self) -> dict[str, tuple[int, int]]:
        """Absolute byte range of every tensor's data in its file, from the safetensors headers."""
        if self._offsets is None:
            self._offsets = {}
            for shard in self._files:
                with open(os.path.join(self.folder, shard), "rb") as f:
                    (size,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(size))
                for name, info in header.items():
                    if name != "__metadata__":
                        begin, end = info["data_offsets"]
                        self._offsets[name] = (8 + size + begin, 8 + size + end)
        return self._offsets

    def _mapping(self, shard: str) -> torch.UntypedStorage:
        """The whole shard mapped copy-on-write, once per shard (lazy: pages are read when touched)."""
        if shard not in self._maps:
            path = os.path.join(self.folder, shard)
            self._maps[shard] = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
        return self._maps[shard]

    def _fd(self, shard: str) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(os.path.join(self.folder, shard), os.O_RDONLY)
        return self._fds[shard]


SLICE_BLOCK_BYTES = 16 << 20  # the buffer a narrow slice of a later dim is read through

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
