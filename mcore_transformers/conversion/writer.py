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
from .reader import SINGLE_FILE

# Files that describe weights; everything else at a source folder's top level is copied verbatim
# (config.json, generation_config.json, tokenizer files, chat templates, README...).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def check_save_target(target: str) -> None:
    """Like transformers' save_pretrained: a target may be absent (parents are made), or a folder (model files
    are written into it, other files stay); a file is refused."""
    if os.path.exists(target) and not os.path.isdir(target):
        raise SaveTargetError(f"Cannot save to {target}: it exists and is a file. Choose a folder path.")


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


TEMP_MARK = ".tmp-"  # .NAME.tmp-PID-XXXXXXXX: the folder a save writes before it commits


def temporary_sibling(target: str) -> str:
    """A fresh folder beside `target` to write into (parents made). Siblings that earlier saves of the same
    target left behind when their process was killed (its PID is gone) are removed first."""
    target = os.path.abspath(target)
    parent, name = os.path.dirname(target), os.path.basename(target)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{name}{TEMP_MARK}"
    for entry in os.listdir(parent):
        if entry.startswith(prefix) and not _process_alive(entry[len(prefix):].split("-")[0]):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    path = os.path.join(parent, f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    return path


def _process_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False  # not ours to judge: only folders named by this writer carry a PID
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def commit_folder(tmp: str, target: str) -> None:
    """Move the finished folder into place. A new target appears whole (one rename). Into an existing folder the
    files move one by one, replacing those of the same name and the weight files of an earlier save (shard sets
    differ); other files (logs, checkpoints, a README) stay, as transformers' save_pretrained leaves them."""
    target = os.path.abspath(target)
    if not os.path.exists(target):
        os.rename(tmp, target)
        return
    written = os.listdir(tmp)
    if any(_is_weight_file(name) for name in written):
        for name in os.listdir(target):
            if _is_weight_file(name) and name not in written:
                os.remove(os.path.join(target, name))
    for name in written:
        destination = os.path.join(target, name)
        if os.path.isdir(destination) and not os.path.islink(destination):
            shutil.rmtree(destination)
        os.replace(os.path.join(tmp, name), destination)
    shutil.rmtree(tmp)


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name.endswith(".safetensors.index.json")


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
