"""Write an HF folder from a stream of tensors: planned shards, index, verbatim source files, atomic rename."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import uuid
from typing import Iterable, Optional, Sequence, Union

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_WEIGHTS_FILE_PATTERN

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


# safetensors' dtype names (the format's spec), for the header this writer composes itself
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class _ShardFile:
    """One safetensors file whose layout is fixed before any tensor arrives: the header (names, dtypes, shapes,
    offsets) is written first, then each tensor's bytes at its offset as it comes, and none is kept.

    Offsets follow safetensors' own writer (larger item sizes first, then by name), so every tensor starts
    aligned to its item size (the header is padded to 8 bytes) and mapped zero-copy views stay aligned.
    """

    def __init__(self, path: str, specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]]):
        self.path, self.offsets, self._fd = path, {}, None
        header, position = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in sorted(specs, key=lambda spec: (-spec[2].itemsize, spec[0])):
            if dtype not in SAFETENSORS_DTYPES:
                raise SaveTargetError(f"{name} is {dtype}, which safetensors does not store: cast the model first.")
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [position, position + size]}
            self.offsets[name] = (position, size, tuple(shape), dtype)
            position += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.prefix = struct.pack("<Q", len(text)) + text
        self.total = len(self.prefix) + position
        self.pending = set(self.offsets)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        start, size, shape, dtype = self.offsets[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"{name}: exported {list(tensor.shape)} {tensor.dtype}, planned {list(shape)} {dtype}")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self._fd, self.total)
            os.pwrite(self._fd, self.prefix, 0)
        _pwrite_all(self._fd, _bytes_of(tensor), len(self.prefix) + start)
        self.pending.discard(name)
        if not self.pending:
            os.close(self._fd)
            self._fd = None

    def create(self) -> None:
        """Write the header and size the file now; the tensors are written by `PartWriter`s (of any rank)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, self.total)
            _pwrite_all(fd, self.prefix, 0)
        finally:
            os.close(fd)
        self.pending.clear()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def _pwrite_all(fd: int, data, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(view):  # pwrite may write less than asked
        done += os.pwrite(fd, view[done:], offset + done)


class PartWriter:
    """Writes tensors, or ranges of their bytes, into files that a `ShardWriter` created (`create_files`), from any
    process that sees those files, with pwrite. Ranks write disjoint bytes of the same files."""

    def __init__(self, locations: dict[str, tuple[str, int]]):
        self.locations = locations  # HF name -> (file, absolute offset of its data)
        self._fds: dict[str, int] = {}

    def _where(self, name: str) -> tuple[int, int]:
        path, offset = self.locations[name]
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_WRONLY)
        return self._fds[path], offset

    def write(self, name: str, data: torch.Tensor, at: int = 0) -> None:
        """`data`'s bytes from byte `at` of tensor `name` on."""
        fd, offset = self._where(name)
        _pwrite_all(fd, _bytes_of(data), offset + at)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ShardWriter:
    """Receives tensors in any order and writes each at once into its planned shard file (nothing is
    buffered: a rank that writes a whole model holds one tensor at a time)."""

    def __init__(self, folder: str, specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size):
        self.folder = folder
        self.split = plan_shards(specs, max_shard_size)
        by_name = {name: (name, tuple(shape), dtype) for name, shape, dtype in specs}
        self._files: dict[str, _ShardFile] = {}
        self._file_of: dict[str, _ShardFile] = {}
        for file, names in self.split.filename_to_tensors.items():
            final = file if self.split.is_sharded else SINGLE_FILE
            shard = _ShardFile(os.path.join(folder, final), [by_name[name] for name in names])
            self._files[file] = shard
            self._file_of.update({name: shard for name in names})

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._file_of[name].write(name, tensor)

    def create_files(self) -> dict[str, tuple[str, int]]:
        """Create every file with its header for `PartWriter`s to fill; returns where each tensor's data goes."""
        for shard in self._files.values():
            shard.create()
        return {
            name: (shard.path, len(shard.prefix) + shard.offsets[name][0]) for name, shard in self._file_of.items()
        }

    def file_sizes(self) -> dict[str, int]:
        return {shard.path: shard.total for shard in self._files.values()}

    def close(self) -> None:
        for shard in self._files.values():
            shard.close()

    def finish(self) -> None:
        self.close()
        unwritten = [file for file, shard in self._files.items() if shard.pending]
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
    writer = None
    try:
        writer = ShardWriter(tmp, specs, max_shard_size)
        for name, tensor in tensors:
            writer.add(name, tensor)
        finish_hf_folder(tmp, target, writer, source_folder, write_config, config_changes)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finish_hf_folder(
    tmp: str, target: str, writer: ShardWriter, source_folder: Optional[str], write_config,
    config_changes: Optional[dict] = None,
) -> None:
    """Once every tensor is in `tmp`'s files: the index, the source's files (config.json with `config_changes`, or
    `write_config(tmp)` without one), then `tmp` moves to `target`."""
    writer.finish()
    copied = copy_source_files(source_folder, tmp)
    if "config.json" in copied:
        rewrite_config(tmp, config_changes or {})
    else:
        write_config(tmp)
    commit_folder(tmp, target)
