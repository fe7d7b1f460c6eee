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
    implied: dict[tuple, tuple] = {}  # the layers share rules and shapes: one meta export per kind, not per layer
    for item in bound:
        kind = (id(item.rule), tuple(item.param.shape))
        if kind not in implied:
            implied[kind] = expected_hf_shapes(item, layout)
        for name, shape in zip(item.hf_names, implied[kind]):
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

    Buffers keep the dtype mcore gave them (the router's expert bias stays float32 in a bf16 model). A parameter built
    in float32 in a lower-precision model (a router weight transformers keeps in float32) stays float32 unless the
    checkpoint holds it in the model dtype already: then it keeps that dtype, the same values, and saves back as read.
    """
    for item in tqdm(bound, desc="Loading weights", disable=not show_progress, unit="tensor"):
        old = item.param
        tensor = item.rule.load(item.rule.view(reader, item.expert), item.hf_names, layout)
        tensor = tensor.to(device=device, dtype=_load_dtype(item, dtype, tensor.dtype))
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
        _install(item, torch.empty(old.shape, dtype=_load_dtype(item, dtype), device=device))


def _load_dtype(item: BoundParam, dtype: torch.dtype, source_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    if item.is_buffer or (item.param.dtype == torch.float32 and source_dtype != dtype):
        return item.param.dtype
    return dtype


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
