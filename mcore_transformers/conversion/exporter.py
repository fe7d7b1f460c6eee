"""mcore shards → full HF tensors, streamed tensor by tensor in checkpoint order (collective).

Every rank walks the same global plan, so the collectives line up. For each entry, the ranks
that hold the parameter gather its shards over its shard group (the TP group, or the expert-TP
group for routed experts) and rebuild the HF tensors; one of them, the entry's `holder`, sends
them on: to every rank that lacks them (`to="all"`, for weight sync) or only to global rank 0
(`to="rank0"`, for saving). Which ranks hold what follows from the layout alone: pipeline
stages hold their layers, expert-parallel ranks their experts, data-parallel replicas copies.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from transformers.utils import logging

from ..errors import CheckpointError
from . import distributed
from .binding import BoundParam
from .loader import expected_hf_shapes
from .placement import Placement, shard_placement
from .reader import CheckpointReader
from .rules import ShardLayout
from .writer import PartWriter

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


def write_parts(
    bound: Sequence[BoundParam],
    layout: ShardLayout,
    plan: Sequence[PlannedTensor],
    files: PartWriter,
    on_written: Optional[Callable[[], None]] = None,
) -> Optional[BaseException]:
    """Collective: each rank writes its own bytes of every HF tensor into the files that `files` reaches (created
    by rank 0 from the same plan), so nothing travels to rank 0.

    A shard lands where the rule's export puts it (`placement.shard_placement`): row ranges are one pwrite each;
    column ranges (row-parallel weights) go through an all-to-all that leaves each rank a block of whole rows,
    again one pwrite. A tensor no shard rank splits is written by its holder;
    a rule with no placement (a transposed export) is gathered to its holder, which writes it whole. Returns the
    first error this rank met: after one, the rank writes nothing more but still takes part in every gather, so
    no rank waits forever.
    """
    mine = {item.order: item for item in bound if item.rule.exported}
    placements: dict[tuple, Optional[Placement]] = {}  # one export of labels per rule and shard shape
    scratch = _Scratch()
    error: Optional[BaseException] = None

    def attempt(write: Callable[[], None]) -> None:
        nonlocal error
        if error is None:
            try:
                write()
            except Exception as err:  # reported by the caller on every rank, once all ranks are done
                error = err

    for entry in plan:
        item = mine.get(entry.order)
        if item is None or not _first_replica(item):
            continue
        names = entry.stack.names if entry.stack is not None else entry.names
        shapes = entry.transfer_shapes
        itemsize = entry.dtype.itemsize
        # a routed expert's slice of stacked tensors starts at its index along their first dimension
        bases = [entry.stack.index * math.prod(shape) * itemsize if entry.stack else 0 for shape in shapes]
        shard, rank = item.param.detach(), _shard_rank(item)
        placement = None
        if item.rule.shard_count(layout) > 1:
            key = (id(item.rule), tuple(shard.shape), rank, tuple(shapes))
            if key not in placements:
                placements[key] = shard_placement(item.rule, layout, tuple(shard.shape), shapes, rank)
            placement = placements[key]
        if placement is not None and placement.split_dim == 1:
            # Columns (row-parallel weights) are strided in the file: an all-to-all first gives each rank whole
            # rows, a block of them, which it writes as one range (measured: faster than a strided copy into a
            # shared mapping of the file, or a pwrite per row).
            count = item.rule.shard_count(layout)
            everyone = []
            for other in range(count):
                other_key = (id(item.rule), tuple(shard.shape), other, tuple(shapes))
                if other_key not in placements:
                    placements[other_key] = shard_placement(item.rule, layout, tuple(shard.shape), shapes, other)
                everyone.append(placements[other_key])
            received, first_row = _exchange_row_blocks(item, shard, count, scratch)
            attempt(lambda: write_row_block(files, received, everyone, first_row, names, shapes, bases, scratch))
        elif placement is not None:
            attempt(lambda: write_runs(files, shard, placement, names, shapes, bases))
        else:  # the holder writes the whole tensors (gathered first when they are split)
            shards = _gather_shards(item, layout, holder_only=True) if item.rule.shard_count(layout) > 1 else [shard]
            if shards is not None and rank == 0:
                tensors = item.rule.export(shards, layout)
                attempt(lambda: [files.write(n, t, b) for n, t, b in zip(names, tensors, bases)])
        if on_written is not None:
            on_written()
    return error


def write_runs(
    files: PartWriter, shard: torch.Tensor, placement: Placement, names: Sequence[str],
    shapes: Sequence[tuple[int, ...]], bases: Sequence[int],
) -> None:
    """This rank's row runs (split dim 0) of `shard` into the HF tensors `names` (of `shapes`), tensor i from byte
    `bases[i]` of it on: one range of the file each."""
    itemsize = shard.dtype.itemsize
    shard = shard.to("cpu").contiguous()
    for run in placement.runs:
        name, shape, base = names[run.tensor], shapes[run.tensor], bases[run.tensor]
        row_bytes = math.prod(shape[1:]) * itemsize
        files.write(name, shard.narrow(0, run.local_start, run.length), base + run.hf_start * row_bytes)


class _Scratch:
    """Buffers reused from one tensor to the next of the same shape (the layers'): fresh memory costs a page fault
    per page, which is most of the time of a copy into it."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, use: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (use, tuple(shape), like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = like.new_empty(shape)
        return self._buffers[key]


def _exchange_row_blocks(
    item: BoundParam, shard: torch.Tensor, count: int, scratch: _Scratch
) -> tuple[torch.Tensor, int]:
    """Collective over `item`'s shard group (an all-to-all): rows [first, first + n) of every rank's shard, as
    [count, n, ...] in rank order, where this rank's block of the rows starts at `first`."""
    group = ps.get_expert_tensor_parallel_group() if item.rule.expert else ps.get_tensor_model_parallel_group()
    rows = shard.shape[0]
    sizes = [rows // count + (block < rows % count) for block in range(count)]
    mine = dist.get_rank(group)
    received = scratch("received", (count * sizes[mine], *shard.shape[1:]), shard)
    dist.all_to_all_single(received, shard.contiguous(), [sizes[mine]] * count, sizes, group=group)
    return received.view(count, sizes[mine], *shard.shape[1:]), sum(sizes[:mine])


def write_row_block(
    files: PartWriter, received: torch.Tensor, placements: Sequence[Placement], first_row: int, names: Sequence[str],
    shapes: Sequence[tuple[int, ...]], bases: Sequence[int], scratch: Optional[_Scratch] = None,
) -> None:
    """Whole rows [first_row, first_row + n) of the HF tensors of a column-split rule, put together from every
    rank's columns of them (`received[rank]`, placed by that rank's runs), one range of the file each."""
    received = received.to("cpu")
    itemsize = received.dtype.itemsize
    scratch = scratch if scratch is not None else _Scratch()
    for number, (name, shape, base) in enumerate(zip(names, shapes, bases)):
        rows = scratch("rows", (received.shape[1], *shape[1:]), received)
        for rank, placement in enumerate(placements):
            for run in placement.runs:
                if run.tensor == number:
                    rows.narrow(1, run.hf_start, run.length).copy_(received[rank].narrow(1, run.local_start, run.length))
        files.write(name, rows, base + first_row * math.prod(shape[1:]) * itemsize)


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
