"""Write an HF folder from a stream of tensors: planned shards, index, verbatim source files, atomic rename."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Iterable, Optional, Sequence, Union

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_WEIGHTS_FILE_PATTERN
from safetensors.torch import save_file

from ..errors import SaveTargetError
from .config_file import rewrite_config
from .reader import INDEX_FILE, SINGLE_FILE

# Files that describe weights; everything else at a source folder's top level is copied verbatim
# (config.json, generation_config.json, tokenizer files, chat templates, README...).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
MODEL_FOLDER_MARKERS = ("config.json", SINGLE_FILE, INDEX_FILE)


def check_save_target(target: str) -> None:
    """A target may be absent, an empty folder, or a model folder (replaced whole); nothing else."""
    if not os.path.exists(target):
        parent = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(parent):
            raise SaveTargetError(f"Cannot save to {target}: its parent folder {parent} does not exist.")
        return
    if not os.path.isdir(target):
        raise SaveTargetError(f"Cannot save to {target}: it exists and is a file. Choose a folder path.")
    entries = os.listdir(target)
    if entries and not any(marker in entries for marker in MODEL_FOLDER_MARKERS):
        raise SaveTargetError(
            f"Cannot save to {target}: it exists and holds files that are not a model ({sorted(entries)[:5]}). "
            "Choose an empty or new folder; an existing model folder is replaced whole."
        )


def plan_shards(specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: Union[int, str]):
    meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape, dtype in specs}
    return split_torch_state_dict_into_shards(
        meta, filename_pattern=SAFETENSORS_WEIGHTS_FILE_PATTERN, max_shard_size=max_shard_size
    )


def copy_source_files(source: Optional[str], destination: str) -> list[str]:
    """Copy non-weight top-level files verbatim (transformers 5 would rewrite config.json on save)."""
    copied = []
    if not source or not os.path.isdir(source):
        return copied
    for entry in sorted(os.listdir(source)):
        path = os.path.join(source, entry)
        if entry.startswith(".") or not os.path.isfile(path) or entry.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copy2(path, os.path.join(destination, entry))
        copied.append(entry)
    return copied


class ShardWriter:
    """Receives tensors in any order; writes each shard file as soon as all of its tensors arrived."""

    def __init__(self, folder: str, specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size):
        self.folder = folder
        self.split = plan_shards(specs, max_shard_size)
        self._pending = {file: set(names) for file, names in self.split.filename_to_tensors.items()}
        self._buffers: dict[str, dict[str, torch.Tensor]] = {file: {} for file in self._pending}
        self._final_names = {}
        if self.split.is_sharded:
            self._final_names = {file: file for file in self._pending}
        else:
            self._final_names = {file: SINGLE_FILE for file in self._pending}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        file = self.split.tensor_to_filename[name]
        self._buffers[file][name] = tensor.detach().to("cpu").contiguous()
        self._pending[file].discard(name)
        if not self._pending[file]:
            save_file(self._buffers.pop(file), os.path.join(self.folder, self._final_names[file]), metadata={"format": "pt"})

    def finish(self) -> None:
        unwritten = [file for file, names in self._pending.items() if names]
        if unwritten:
            raise RuntimeError(f"Export ended before these shards were complete: {unwritten}")
        if self.split.is_sharded:
            index = {"metadata": dict(self.split.metadata), "weight_map": dict(self.split.tensor_to_filename)}
            with open(os.path.join(self.folder, SAFETENSORS_INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")


def temporary_sibling(target: str) -> str:
    target = os.path.abspath(target)
    path = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    return path


def commit_folder(tmp: str, target: str) -> None:
    """Move the finished folder into place; an existing model folder is swapped out, then removed."""
    target = os.path.abspath(target)
    old = None
    if os.path.exists(target):
        old = f"{tmp}.old"
        os.rename(target, old)
    os.rename(tmp, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_hf_folder(
    target: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    max_shard_size: Union[int, str],
    source_folder: Optional[str],
    write_config,
    config_changes: Optional[dict] = None,
) -> None:
    """Stream `tensors` into a new folder at `target`; on any failure the target is left untouched.

    The source's config.json is copied verbatim with only `config_changes` written over it (see
    config_file.config_changes); without a source config, `write_config(folder)` writes one.
    """
    tmp = temporary_sibling(target)
    try:
        writer = ShardWriter(tmp, specs, max_shard_size)
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.finish()
        copied = copy_source_files(source_folder, tmp)
        if "config.json" in copied:
            rewrite_config(tmp, config_changes or {})
        else:
            write_config(tmp)
        commit_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
