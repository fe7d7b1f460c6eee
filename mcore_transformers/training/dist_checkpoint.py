"""Model and megatron-core optimizer state in megatron-core's distributed checkpoint format.

`mcore_state/dist_ckpt/` is a `megatron.core.dist_checkpointing` folder (torch_dist backend) holding
{"model": the chunk's sharded state dict ("model0", "model1", ... under virtual pipeline stages, as
Megatron-LM names them), "optimizer": the optimizer's}. Every tensor is saved with its global shape
and this rank's offsets, so loading at another tp / pp / vpp / ep / dp reads back the slices the
new layout needs: resharding is dist_checkpointing's own. The distributed optimizer saves its state
"fully_reshardable" (in model space), so it reshards like the rest.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil

from ..runtime.parallel import barrier, is_rank0
from ..runtime.cpu import (
    bridge_torch_optimizer_checkpointing,
    fill_fresh_adam_state,
    megatron_optimizer_device,
    untie_adam_steps,
)
from .errors import TrainingError

DIST_DIR = "dist_ckpt"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _chunks_by_key(model) -> dict:
    """The model's chunks under Megatron-LM's keys: "model", or "model0", "model1"... under vpp."""
    chunks = model.chunks
    return {"model": chunks[0]} if len(chunks) == 1 else {f"model{i}": chunk for i, chunk in enumerate(chunks)}


def model_sharded_state(model) -> dict:
    """The chunks' sharded state dicts under Megatron-LM's keys."""
    return {key: chunk.sharded_state_dict() for key, chunk in _chunks_by_key(model).items()}


def _write_in_this_process() -> None:
    """Bridges dist_checkpointing/strategies/filesystem_async.py: its first save creates a results queue
    served by a *spawned* multiprocessing Manager, a fresh interpreter that re-imports the user's
    script (and re-runs it when the script is not guarded by `if __name__ == "__main__"`). That queue
    is only read by the saving process itself when the save is synchronous, as here, so an in-process
    queue serves. (Its per-file writer processes are forked and stay.)"""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save(path: str, model, optimizer) -> None:
    """Collective: write model and optimizer into `path` (written as path.partial, then renamed)."""
    from megatron.core import dist_checkpointing

    partial = path + ".partial"
    if is_rank0():
        for stale in (partial, path):
            if os.path.exists(stale):
                shutil.rmtree(stale)
        os.makedirs(partial)
    barrier()
    state = model_sharded_state(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    _write_in_this_process()
    with megatron_optimizer_device():
        dist_checkpointing.save(state, partial)
    barrier()
    if is_rank0():
        os.replace(partial, path)
    barrier()


def _check(path: str) -> None:
    from megatron.core import dist_checkpointing

    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise TrainingError(
            f"{path} is not a complete megatron-core distributed checkpoint (its metadata is missing): the save "
            "was interrupted. Resume from an earlier checkpoint."
        )


@contextlib.contextmanager
def _not_fitting(path: str):
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
        raise TrainingError(
            f"The checkpoint in {path} does not fit this model: {reason}. Was it written for another model (or "
            "another architecture setting)? Resume with the model it was trained from."
        ) from err


def load_model(path: str, model) -> None:
    """Collective: the model's weights from `path`, read at this model's layout."""
    from megatron.core import dist_checkpointing

    _check(path)
    wanted = model_sharded_state(model)
    with megatron_optimizer_device(), _not_fitting(path):
        loaded = dist_checkpointing.load(wanted, path)
    for key, chunk in _chunks_by_key(model).items():
        chunk.load_state_dict(loaded[key], strict=True)


def load_optimizer(path: str, model, optimizer) -> None:
    """Collective: the optimizer's state (masters, moments, step, loss scale) from `path`, at this layout."""
    from megatron.core import dist_checkpointing

    _check(path)
    bridge_torch_optimizer_checkpointing()
    if optimizer.megatron.config.use_distributed_optimizer:
        for inner in optimizer.chained:
            fill_fresh_adam_state(inner.optimizer)
    wanted = {"optimizer": optimizer.sharded_state_dict(model_sharded_state(model), is_loading=True,
                                                       metadata=OPTIMIZER_METADATA)}
    with megatron_optimizer_device(), _not_fitting(path):
        loaded = dist_checkpointing.load(wanted, path)
    optimizer.load_state_dict(loaded["optimizer"])
    if optimizer.megatron.config.use_distributed_optimizer:
        for inner in optimizer.chained:
            untie_adam_steps(inner.optimizer)
