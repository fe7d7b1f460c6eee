"""Model weights as a megatron-core distributed checkpoint (`dist_checkpointing`, torch_dist backend).

A folder in this format holds what an HF folder holds besides its weights, and the weights in megatron's
sharded form, in the layout MCoreTrainer's `checkpoint-N/` uses:

    config.json, generation_config.json, tokenizer files ...   the source's, verbatim (dtype updated)
    mcore_state/layout.json        tp, pp, vpp, ep, etp, world size, dtype, query groups of the writer
    mcore_state/hf_tensors.json    the HF tensor names the weights came from (picks the HF layout on export)
    mcore_state/dist_ckpt/         {"model": chunk.sharded_state_dict()} ("model0", "model1"... under vpp)
    mcore_state/unclaimed/         source tensors no rule claims (DeepSeek-V3's MTP layers), copied verbatim
    mcore_state/adapter/           with a LoRA adapter ("adapter" in dist_ckpt/ too): peft/distributed.py

Every tensor is saved with its global shape and this rank's offsets, so reading it at another tp / pp /
vpp / ep / etp takes the slices the new layout needs (resharding is megatron's own; the vocabulary's
padding too). Each rank writes only its shards and reads only the bytes it owns. One thing does not
reshard: KV heads repeated for a tp that does not divide them (`building.query_groups_for`) change
`linear_qkv`'s global shape, so such a checkpoint loads only at a tp with the same query-group count.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import shutil
from typing import Optional, Sequence

import torch.distributed as dist

from ..errors import CheckpointError, SaveTargetError
from ..runtime.cpu import megatron_optimizer_device
from ..runtime.parallel import barrier, is_rank0
from .reader import weight_files
from .writer import temporary_sibling

STATE_DIR = "mcore_state"
DIST_DIR = "dist_ckpt"
LAYOUT_FILE = "layout.json"
HF_NAMES_FILE = "hf_tensors.json"
UNCLAIMED_DIR = "unclaimed"
LAYOUT_FORMAT_VERSION = 3


def dist_dir(folder: str) -> str:
    return os.path.join(folder, STATE_DIR, DIST_DIR)


def is_distributed_checkpoint(folder: str) -> bool:
    """A folder with megatron-core weights (written by `save_distributed` or MCoreTrainer's megatron optimizer)."""
    return os.path.isdir(dist_dir(folder))


def has_hf_weights(folder: str, variant: Optional[str] = None) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in weight_files(variant))


def chunks_by_key(chunks: Sequence) -> dict:
    """The model's chunks under Megatron-LM's keys: "model", or "model0", "model1"... under vpp."""
    return {"model": chunks[0]} if len(chunks) == 1 else {f"model{i}": chunk for i, chunk in enumerate(chunks)}


def model_sharded_state(chunks: Sequence) -> dict:
    return {key: chunk.sharded_state_dict() for key, chunk in chunks_by_key(chunks).items()}


def layout_record(model) -> dict:
    """What layout.json says about the writer's layout (the training state adds its own entries)."""
    layout = model.layout
    return {
        "format_version": LAYOUT_FORMAT_VERSION,
        "tp": layout.tp,
        "pp": layout.pp,
        "vpp": layout.virtual_stages,
        "ep": layout.ep,
        "etp": layout.etp or layout.tp,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "dtype": str(model.dtype).replace("torch.", ""),
        "query_groups": model.shard_layout.num_query_groups,
    }


def read_layout(folder: str) -> Optional[dict]:
    path = os.path.join(folder, STATE_DIR, LAYOUT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def saved_hf_names(folder: str) -> Optional[set[str]]:
    path = os.path.join(folder, STATE_DIR, HF_NAMES_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return set(json.load(f))


def unclaimed_folder(folder: str) -> str:
    return os.path.join(folder, STATE_DIR, UNCLAIMED_DIR)


def write_in_this_process() -> None:
    """Bridges dist_checkpointing/strategies/filesystem_async.py: its first save creates a results queue
    served by a *spawned* multiprocessing Manager, a fresh interpreter that re-imports the user's
    script (and re-runs it when the script is not guarded by `if __name__ == "__main__"`). That queue
    is only read by the saving process itself when the save is synchronous, as here, so an in-process
    queue serves. (Its per-file writer processes are forked and stay.)"""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def check_complete(path: str, error: type, advice: str) -> None:
    from megatron.core import dist_checkpointing

    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise error(
            f"{path} is not a complete megatron-core distributed checkpoint (its metadata is missing): the save "
            f"was interrupted. {advice}"
        )


@contextlib.contextmanager
def not_fitting(path: str, error: type, advice: str):
    """megatron's and torch's errors for a checkpoint of another model (a tensor it lacks, another shape)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (KeyError, CheckpointingException, CheckpointException) as err:
        cause = err
        if isinstance(err, CheckpointException) and err.failures:  # the first rank's own error
            cause = next(iter(err.failures.values()))
            cause = getattr(cause, "exc", cause)
        reason = str(cause) if len(str(cause)) < 300 else str(cause)[:300] + " ..."
        raise error(
            f"The checkpoint in {path} does not fit this model: {reason}. Was it written for another model (or "
            f"another architecture setting)? {advice}"
        ) from err


def check_query_groups(folder: str, shard_layout, error: type) -> None:
    """Refuse a checkpoint whose KV heads were repeated into another number of query groups than this
    layout's (their global shape differs; see the module docstring)."""
    saved = read_layout(folder)
    if saved is None:
        return
    groups = saved.get("query_groups") or math.lcm(shard_layout.num_key_value_heads, saved["tp"])
    if groups != shard_layout.num_query_groups:
        raise error(
            f"{folder} was written at tp={saved['tp']}, where the {shard_layout.num_key_value_heads} KV heads are "
            f"repeated into {groups} query groups; this layout (tp={shard_layout.tp_size}) uses "
            f"{shard_layout.num_query_groups}, so its attention weights have another shape. Load it at a tp with "
            f"{groups} query groups (e.g. tp={saved['tp']}), or convert it to an HF folder first "
            f"(`mcore-transformers convert {folder} HF_DIR --tp {saved['tp']}`), which reshards to any tp."
        )


def load_sharded(folder: str, wanted: dict, error: type = CheckpointError, advice: str = "") -> dict:
    """Collective: the entries of `wanted` (a sharded state dict) from `folder`'s distributed checkpoint.
    Entries the checkpoint holds beyond them (an adapter's state, an optimizer's) are not read."""
    from megatron.core import dist_checkpointing

    path = dist_dir(folder)
    check_complete(path, error, advice)
    with megatron_optimizer_device(), not_fitting(path, error, advice):
        return dist_checkpointing.load(wanted, path)


def load_chunks(folder: str, chunks: Sequence, shard_layout, error: type = CheckpointError, advice: str = "") -> None:
    """Collective: the chunks' weights from `folder`'s distributed checkpoint, read at their layout."""
    check_complete(dist_dir(folder), error, advice)
    check_query_groups(folder, shard_layout, error)
    loaded = load_sharded(folder, model_sharded_state(chunks), error, advice)
    for key, chunk in chunks_by_key(chunks).items():
        chunk.load_state_dict(loaded[key], strict=True)


def save_distributed(
    model, target: str, hf_names: Sequence[str], write_extras, extra_state: Optional[dict] = None
) -> None:
    """Collective: write `model`'s weights as a distributed checkpoint folder at `target` (module docstring).

    The folder is written beside `target` and renamed into place once complete; `target` must not exist or
    be empty. Rank 0 calls `write_extras(folder)` for the non-weight files before the rename. `extra_state`
    (sharded state under top-level keys of its own, e.g. a LoRA adapter's) is written with the weights.
    """
    from megatron.core import dist_checkpointing

    outcome: list = [None]
    if is_rank0():
        try:
            if os.path.isfile(target) or (os.path.isdir(target) and os.listdir(target)):
                raise SaveTargetError(
                    f"Cannot write a distributed checkpoint to {target}: it exists and is not an empty folder. "
                    "Choose a new folder (a distributed checkpoint is written whole, never merged into another)."
                )
            outcome[0] = temporary_sibling(target)
        except Exception as err:  # raised on every rank below, before any collective write
            outcome[0] = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    tmp = outcome[0]
    try:
        if is_rank0():
            os.makedirs(dist_dir(tmp))
        barrier()
        state = model_sharded_state(model.chunks)
        clash = sorted(set(state) & set(extra_state or {}))
        if clash:
            raise ValueError(f"extra state under {clash} would replace the model's own entries")
        state.update(extra_state or {})
        write_in_this_process()
        with megatron_optimizer_device():
            dist_checkpointing.save(state, dist_dir(tmp))
        barrier()
        if is_rank0():
            with open(os.path.join(tmp, STATE_DIR, LAYOUT_FILE), "w") as f:
                json.dump({**layout_record(model), "optimizer": None}, f, indent=1)  # weights only
            with open(os.path.join(tmp, STATE_DIR, HF_NAMES_FILE), "w") as f:
                json.dump(sorted(hf_names), f, indent=0)
            write_extras(tmp)
            if os.path.isdir(target):
                os.rmdir(target)  # empty (checked above)
            os.rename(tmp, target)
        barrier()
    except BaseException:
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
