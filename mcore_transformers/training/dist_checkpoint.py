"""Model and megatron-core optimizer state in megatron-core's distributed checkpoint format.

`mcore_state/dist_ckpt/` is a `megatron.core.dist_checkpointing` folder (torch_dist backend) holding
{"model": the chunk's sharded state dict ("model0", "model1", ... under virtual pipeline stages, as
Megatron-LM names them), "optimizer": the optimizer's}. Every tensor is saved with its global shape
and this rank's offsets, so loading at another tp / pp / vpp / ep / dp reads back the slices the
new layout needs: resharding is dist_checkpointing's own. The distributed optimizer saves its state
"fully_reshardable" (in model space), so it reshards like the rest.
"""

from __future__ import annotations

import os
import shutil

from ..conversion import distributed
from ..runtime.parallel import barrier, is_rank0
from ..runtime.cpu import (
    bridge_torch_optimizer_checkpointing,
    fill_fresh_adam_state,
    megatron_optimizer_device,
    untie_adam_steps,
)
from .errors import TrainingError

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
RESUME_ADVICE = "Resume from an earlier checkpoint, or with the model it was trained from."


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
    state = distributed.model_sharded_state(model.chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    distributed.write_in_this_process()
    with megatron_optimizer_device():
        dist_checkpointing.save(state, partial)
    barrier()
    if is_rank0():
        os.replace(partial, path)
    barrier()


def load_model(folder: str, model) -> None:
    """Collective: the model's weights from checkpoint `folder`'s dist_ckpt/, read at this model's layout."""
    distributed.load_chunks(folder, model.chunks, model.shard_layout, TrainingError, RESUME_ADVICE)


def load_optimizer(folder: str, model, optimizer) -> None:
    """Collective: the optimizer's state (masters, moments, step, loss scale) from `folder`, at this layout."""
    from megatron.core import dist_checkpointing

    path = distributed.dist_dir(folder)
    distributed.check_complete(path, TrainingError, RESUME_ADVICE)
    bridge_torch_optimizer_checkpointing()
    if optimizer.megatron.config.use_distributed_optimizer:
        for inner in optimizer.chained:
            fill_fresh_adam_state(inner.optimizer)
    wanted = {"optimizer": optimizer.sharded_state_dict(distributed.model_sharded_state(model.chunks), is_loading=True,
                                                       metadata=OPTIMIZER_METADATA)}
    with megatron_optimizer_device(), distributed.not_fitting(path, TrainingError, RESUME_ADVICE):
        loaded = dist_checkpointing.load(wanted, path)
    optimizer.load_state_dict(loaded["optimizer"])
    if optimizer.megatron.config.use_distributed_optimizer:
        for inner in optimizer.chained:
            untie_adam_steps(inner.optimizer)
