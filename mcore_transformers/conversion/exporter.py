"""mcore shards → full HF tensors, streamed tensor by tensor in checkpoint order (collective).

Every rank walks the same global plan, so the collectives line up. For each entry, the ranks
that hold the parameter gather its shards over its shard group (the TP group, or the expert-TP
group for routed experts) and rebuild the HF tensors; one of them, the entry's `holder`, sends
them on: to every rank that lacks them (`to="all"`, for weight sync) or only to global rank 0
(`to="rank0"`, for saving). Which ranks hold what follows from the layout alone: pipeline
stages hold their layers, expert-parallel ranks their experts, data-parallel replicas copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Iterator, Literal, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from transformers.utils import logging

from ..errors import CheckpointError
from . import distributed
from .binding import BoundParam
from .loader import expected_hf_shapes
from .reader import CheckpointReader
from .rules import ShardLayout

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class StackPart:
    """An exported parameter that is slice `index` of `count` of stacked HF tensors (routed experts)."""

    index: int
    count: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # of this slice


@dataclass(frozen=True)
class PlannedTensor:
    """One exported parameter: where it lives and the HF tensors it completes.

    `names` / `shapes` are the HF tensors ready once this entry has been exported: its own, or for
    a slice of stacked tensors (`stack`), the full stacked tensors on the last slice and none before.
    """

    order: tuple
    owner: int  # pipeline rank holding the parameter
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    holder: int = 0  # global rank that hands the full tensors on
    everywhere: bool = True  # every rank holds the parameter: nothing has to travel for `to="all"`
    stack: Optional[StackPart] = None
    buffer: bool = False  # a buffer, not a parameter (saved like one, not counted as one)

    @property
    def transfer_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.stack.shapes if self.stack is not None else self.shapes


def _first_replica(item: BoundParam) -> bool:
    """Whether this rank's copy is the one exported (data-parallel replicas hold identical copies)."""
    if item.rule.expert:
        return ps.get_expert_data_parallel_rank() == 0
    return ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0


def _shard_rank(item: BoundParam) -> int:
    if item.rule.expert:
        return ps.get_expert_tensor_parallel_rank()
    return ps.get_tensor_model_parallel_rank()


def _is_holder(item: BoundParam) -> bool:
    return _first_replica(item) and _shard_rank(item) == 0


def export_plan(bound: Sequence[BoundParam], layout: ShardLayout) -> list[PlannedTensor]:
    """The global, ordered list of exported tensors; identical on every rank (collective over the world)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    exported = [item for item in bound if item.rule.exported]
    held = [item.order for item in exported]
    # Each entry is described once, by its holder (exactly one rank per parameter is the holder).
    described = [_describe(item, layout, rank) for item in exported if _is_holder(item)]
    stages = [(held, described)]
    if world > 1:
        stages = [None] * world
        dist.all_gather_object(stages, (held, described))
    copies: dict[tuple, int] = {}
    for orders, _ in stages:
        for order in orders:
            copies[order] = copies.get(order, 0) + 1
    plan = [replace(entry, everywhere=copies[entry.order] == world) for _, entries in stages for entry in entries]
    return sorted(plan, key=lambda entry: entry.order)


def _describe(item: BoundParam, layout: ShardLayout, rank: int) -> PlannedTensor:
    names, shapes = item.hf_names, expected_hf_shapes(item, layout)
    stack = None
    if item.rule.stacked:
        stack = StackPart(item.expert, layout.num_experts, names, tuple(shape[1:] for shape in shapes))
        if item.expert != layout.num_experts - 1:
            names, shapes = (), ()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    return PlannedTensor(
        item.order, pp_rank, names, shapes, item.param.dtype, holder=rank, stack=stack, buffer=item.is_buffer
    )


def _gather_shards(item: BoundParam, layout: ShardLayout, holder_only: bool) -> Optional[list[torch.Tensor]]:
    """The shards of `item` in rank order, on every rank of its shard group, or (`holder_only`) only on
    the group's first rank (None elsewhere: those ranks have nothing to rebuild)."""
    param = item.param.detach()
    count = item.rule.shard_count(layout)
    if count == 1:
        return [param]
    group = ps.get_expert_tensor_parallel_group() if item.rule.expert else ps.get_tensor_model_parallel_group()
    if holder_only:
        first = dist.get_rank(group) == 0
        shards = [torch.empty_like(param) for _ in range(count)] if first else None
        dist.gather(param.contiguous(), shards, dst=dist.get_global_rank(group, 0), group=group)
        return shards
    shards = [torch.empty_like(param) for _ in range(count)]
    dist.all_gather(shards, param.contiguous(), group=group)
    return shards


def gather_full(item: BoundParam, layout: ShardLayout) -> tuple[torch.Tensor, ...]:
    """Collective over `item`'s shard group: its full HF tensors, on every rank of the group."""
    return item.rule.export(_gather_shards(item, layout, holder_only=False), layout)


def iter_hf_tensors(
    bound: Sequence[BoundParam],
    layout: ShardLayout,
    plan: Optional[list[PlannedTensor]] = None,
    to: Literal["all", "rank0"] = "all",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) in plan order on every rank (`all`) or on global rank 0 only (`rank0`).

    At most one entry's tensors (one parameter; for routed experts, one expert's) are in flight at a
    time. Experts a checkpoint stores stacked are assembled, expert by expert, on the receiving ranks.
    """
    plan = plan if plan is not None else export_plan(bound, layout)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    mine = {item.order: item for item in bound if item.rule.exported}
    device = bound[0].param.device if bound else torch.device("cpu")
    stacks: dict[str, torch.Tensor] = {}  # stacked HF tensors being filled, expert by expert

    for entry in plan:
        item = mine.get(entry.order)
        tensors: Optional[Sequence[torch.Tensor]] = None
        # Every replica rebuilds its own copy for `all` (no cross-replica traffic); for `rank0` only
        # the holder's shard group gathers, to the holder. A shard group is all in or all out.
        if item is not None and (to == "all" or _first_replica(item)):
            shards = _gather_shards(item, layout, holder_only=to == "rank0")
            if shards is not None:
                tensors = item.rule.export(shards, layout)
        if distributed and to == "all" and not entry.everywhere:
            if tensors is None:
                tensors = [torch.empty(shape, dtype=entry.dtype, device=device) for shape in entry.transfer_shapes]
            for tensor in tensors:
                dist.broadcast(tensor, src=entry.holder)
        elif distributed and to == "rank0" and entry.holder != 0:
            if rank == entry.holder:
                for tensor in tensors:
                    dist.send(tensor.contiguous(), dst=0)
            elif rank == 0:
                tensors = [torch.empty(shape, dtype=entry.dtype, device=device) for shape in entry.transfer_shapes]
                for tensor in tensors:
                    dist.recv(tensor, src=entry.holder)
        if tensors is None or (to == "rank0" and rank != 0):
            continue
        if entry.stack is None:
            yield from zip(entry.names, tensors)
            continue
        part = entry.stack
        for name, tensor in zip(part.names, tensors):
            if name not in stacks:
                stacks[name] = torch.empty((part.count, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
            stacks[name][part.index].copy_(tensor)
        if part.index == part.count - 1:
            yield from ((name, stacks.pop(name)) for name in part.names)


class UnclaimedTensors:
    """Tensors of the source checkpoint that no rule claims, copied verbatim into a saved folder.

    transformers ignores some tensors a checkpoint carries (DeepSeek-V3's multi-token-prediction
    layers `model.layers.{num_hidden_layers + k}.*`); the model never holds them, so they cannot
    change, and a save keeps them bit for bit. Rank 0 reads them from the source when it writes.
    """

    def __init__(self, source_folder: Optional[str], plan: Sequence[PlannedTensor], variant: Optional[str] = None):
        self.reader, self.names = None, []
        if not source_folder or not os.path.isdir(source_folder):
            return
        if distributed.is_distributed_checkpoint(source_folder) and not distributed.has_hf_weights(source_folder, variant):
            # A distributed checkpoint keeps the source's unclaimed tensors in a folder of their own.
            source_folder, variant = distributed.unclaimed_folder(source_folder), None
            if not os.path.isdir(source_folder):
                return
        try:
            self.reader = CheckpointReader(source_folder, variant)
        except CheckpointError as err:  # the source is gone or unreadable: nothing to copy
            logger.warning(f"Not copying unused source tensors into the saved folder: {err}")
            return
        claimed = {name for entry in plan for name in (entry.stack.names if entry.stack else entry.names)}
        self.names = [name for name in self.reader.names() if name not in claimed]

    @property
    def specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(name, self.reader.shape(name), self.reader.dtype(name)) for name in self.names]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.reader.read(name)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
