"""HF checkpoint → this rank's mcore parameters: validate everything first, then read only owned bytes."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..errors import CheckpointError
from .binding import BoundParam
from .reader import CheckpointReader
from .rules import ShardLayout


def expected_hf_shapes(bound: BoundParam, layout: ShardLayout) -> tuple[tuple[int, ...], ...]:
    """The HF shapes this parameter implies, found by exporting meta shards (no layout logic repeated)."""
    shard = torch.empty(bound.param.shape, dtype=bound.param.dtype, device="meta")
    shards = [shard] * bound.rule.shard_count(layout)
    shapes = tuple(tuple(t.shape) for t in bound.rule.export(shards, layout))
    if bound.rule.stacked:  # the HF tensor holds every expert; this parameter is one slice
        shapes = tuple((layout.num_experts, *shape) for shape in shapes)
    return shapes


def _checkpoint_problem(bound: Sequence[BoundParam], reader: CheckpointReader, layout: ShardLayout) -> Optional[str]:
    missing, wrong = [], []
    for item in bound:
        for name, shape in zip(item.hf_names, expected_hf_shapes(item, layout)):
            if name not in reader:
                missing.append(name)
            elif reader.shape(name) != shape:
                wrong.append(f"{name}: checkpoint {list(reader.shape(name))}, config implies {list(shape)}")
    if missing:
        missing = sorted(set(missing))
        return (
            f"{len(missing)} tensor(s) the config needs are missing from {reader.folder}: {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}. The checkpoint is incomplete or does not belong to this config."
        )
    if wrong:
        return (
            f"{len(wrong)} tensor(s) in {reader.folder} have shapes that do not match config.json: {wrong[:4]}. "
            "The weights and config.json come from different models."
        )
    return None


def check_checkpoint(bound: Sequence[BoundParam], reader: CheckpointReader, layout: ShardLayout) -> None:
    """Every tensor this rank needs is present with the shape the config implies; raise before reading.

    Collective when distributed: ranks need different tensors (pipeline stages, the experts each
    expert-parallel rank owns), so a problem seen by one rank is raised on every rank, none reads.
    """
    problem = _checkpoint_problem(bound, reader, layout)
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems: list = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise CheckpointError(problem)


def load_parameters(
    bound: Sequence[BoundParam],
    reader: CheckpointReader,
    layout: ShardLayout,
    dtype: torch.dtype,
    device: torch.device,
    show_progress: bool = False,
) -> None:
    """Replace each meta parameter with its shard. Whole, same-dtype tensors stay zero-copy mappings.

    Buffers keep the dtype mcore gave them (the router's expert bias stays float32 in a bf16 model).
    """
    for item in tqdm(bound, desc="Loading weights", disable=not show_progress, unit="tensor"):
        old = item.param
        tensor = item.rule.load(item.rule.view(reader, item.expert), item.hf_names, layout)
        tensor = tensor.to(device=device, dtype=old.dtype if item.is_buffer else dtype)
        if tuple(tensor.shape) != tuple(old.shape):
            raise CheckpointError(
                f"{item.hf_names} produced a shard of shape {list(tensor.shape)} for {item.rule.mcore}, "
                f"expected {list(old.shape)}."
            )
        _install(item, tensor)


def materialise_empty(bound: Sequence[BoundParam], dtype: torch.dtype, device: torch.device) -> None:
    """Replace each meta parameter with an uninitialised tensor of its shape (filled by a distributed load)."""
    for item in bound:
        old = item.param
        _install(item, torch.empty(old.shape, dtype=old.dtype if item.is_buffer else dtype, device=device))


def _install(item: BoundParam, tensor: torch.Tensor) -> None:
    old = item.param
    if item.is_buffer:
        item.module._buffers[item.attr] = tensor
        return
    new = nn.Parameter(tensor, requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)  # mcore's tensor_model_parallel / partition_dim / shared flags
    item.module._parameters[item.attr] = new


def check_materialised(chunks: Sequence[nn.Module]) -> None:
    leftovers = [n for c in chunks for n, t in [*c.named_parameters(), *c.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"These tensors were never loaded: {leftovers[:8]} (no rule wrote them).")
