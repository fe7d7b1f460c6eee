"""Data for a sharded model: batches split by data-parallel rank only, results gathered the same way.

Every tensor-/pipeline-parallel rank of one model replica must see the same batch; accelerate, left
to itself, would give each process of the world its own. We keep transformers' and accelerate's
dataloader machinery (samplers, seeding, `even_batches`, skipping on resume) and only tell it that
there are `dp` processes, and which one this rank is.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from accelerate.data_loader import prepare_data_loader
from megatron.core import parallel_state as ps


def dp_size() -> int:
    return ps.get_data_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def dp_rank() -> int:
    return ps.get_data_parallel_rank() if ps.model_parallel_is_initialized() else 0


@contextlib.contextmanager
def data_parallel_loaders(accelerator):
    """Within this block `accelerator.prepare(DataLoader)` shards by data-parallel rank, not by process."""

    def prepare(data_loader, device_placement=None, slice_fn_for_dispatch=None):
        if getattr(data_loader, "_is_accelerate_prepared", False):
            return data_loader
        if device_placement is None:
            device_placement = accelerator.device_placement
        prepared = prepare_data_loader(
            data_loader,
            accelerator.device,
            num_processes=dp_size(),
            process_index=dp_rank(),
            split_batches=accelerator.split_batches,
            put_on_device=device_placement,
            rng_types=accelerator.rng_types.copy(),
            # accelerate's dispatcher reads on process 0 of the world and scatters to all processes:
            # that is per process, not per replica. Each replica reads its own shard instead.
            dispatch_batches=False,
            even_batches=accelerator.even_batches,
            use_seedable_sampler=accelerator.use_seedable_sampler,
            data_seed=accelerator.dataloader_config.data_seed,
            non_blocking=accelerator.non_blocking,
            use_stateful_dataloader=accelerator.use_stateful_dataloader,
        )
        accelerator._dataloaders.append(prepared)
        return prepared

    accelerator.prepare_data_loader = prepare
    try:
        yield
    finally:
        del accelerator.prepare_data_loader


def gather_over_data_parallel(data: Any) -> Any:
    """Concatenate (along dim 0) a (nested) tensor from every data-parallel rank, in rank order."""
    if isinstance(data, (list, tuple)):
        return type(data)(gather_over_data_parallel(item) for item in data)
    if isinstance(data, dict):
        return type(data)({key: gather_over_data_parallel(value) for key, value in data.items()})
    if not isinstance(data, torch.Tensor) or dp_size() == 1:
        return data
    tensor = data.contiguous()
    if tensor.dim() == 0:
        tensor = tensor[None]
    parts = [torch.empty_like(tensor) for _ in range(dp_size())]
    dist.all_gather(parts, tensor, group=ps.get_data_parallel_group())
    return torch.cat(parts, dim=0)


def truncate_to(data: Any, length: int) -> Any:
    if isinstance(data, (list, tuple)):
        return type(data)(truncate_to(item, length) for item in data)
    if isinstance(data, dict):
        return type(data)({key: truncate_to(value, length) for key, value in data.items()})
    if isinstance(data, torch.Tensor):
        return data[:length]
    return data


def batch_signature(batch: dict) -> torch.Tensor:
    """Shape and checksums of a batch's input ids and labels, to compare across ranks of a replica."""
    ids = batch["input_ids"]
    weights = torch.arange(ids.numel(), device=ids.device).remainder(1009).add(1).view(ids.shape)
    labels = batch.get("labels")
    label_sum = (labels.long() * weights).sum() if labels is not None and labels.shape == ids.shape else 0
    return torch.tensor(
        [ids.shape[0], ids.shape[1], int((ids.long() * weights).sum()), int(label_sum)],
        dtype=torch.int64,
        device=ids.device,
    )


def check_replica_agrees(batch: dict) -> bool:
    """True when every rank of this model replica (tensor and pipeline parallel) holds the same batch."""
    group = ps.get_model_parallel_group()
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    if size == 1:
        return True
    signature = batch_signature(batch)
    gathered = [torch.empty_like(signature) for _ in range(size)]
    dist.all_gather(gathered, signature, group=group)
    return all(torch.equal(g, gathered[0]) for g in gathered)
