"""mcore shards → full HF tensors, streamed tensor by tensor in checkpoint order (collective).

Every rank walks the same global plan, so the collectives line up: the owning pipeline stage
gathers a parameter over its TP group and rebuilds the HF tensors, which then travel to every
rank (`to="all"`, for weight sync) or only to global rank 0 (`to="rank0"`, for saving).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from .binding import BoundParam
from .loader import expected_hf_shapes
from .rules import ShardLayout


@dataclass(frozen=True)
class PlannedTensor:
    """One exported parameter: where it lives and the HF tensors it becomes."""

    order: tuple
    owner: int  # pipeline rank holding the parameter
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype


def export_plan(bound: Sequence[BoundParam], layout: ShardLayout) -> list[PlannedTensor]:
    """The global, ordered list of exported tensors; identical on every rank (collective over PP)."""
    pp_rank = ps.get_pipeline_model_parallel_rank()
    local = [
        PlannedTensor(item.order, pp_rank, item.hf_names, expected_hf_shapes(item, layout), item.param.dtype)
        for item in bound
        if item.rule.exported
    ]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        gathered: list = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(gathered, local, group=ps.get_pipeline_model_parallel_group())
        local = [entry for stage in gathered for entry in stage]
    return sorted(local, key=lambda entry: entry.order)


def _gather_shards(item: BoundParam, layout: ShardLayout) -> list[torch.Tensor]:
    param = item.param.detach()
    if item.rule.tp_dim is None or layout.tp_size == 1:
        return [param]
    shards = [torch.empty_like(param) for _ in range(layout.tp_size)]
    dist.all_gather(shards, param.contiguous(), group=ps.get_tensor_model_parallel_group())
    return shards


def iter_hf_tensors(
    bound: Sequence[BoundParam],
    layout: ShardLayout,
    plan: Optional[list[PlannedTensor]] = None,
    to: Literal["all", "rank0"] = "all",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) in plan order on every rank (`all`) or on global rank 0 only (`rank0`)."""
    plan = plan if plan is not None else export_plan(bound, layout)
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    first_replica = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    if to == "rank0" and not first_replica:
        return  # other data-parallel replicas hold identical copies
    receives = to == "all" or (layout.tp_rank == 0 and pp_rank == 0)
    mine = {item.order: item for item in bound if item.rule.exported}
    device = bound[0].param.device if bound else torch.device("cpu")

    for entry in plan:
        tensors: Optional[Sequence[torch.Tensor]] = None
        if entry.owner == pp_rank:
            tensors = mine[entry.order].rule.export(_gather_shards(mine[entry.order], layout), layout)
        if pp_size > 1:
            if to == "all":
                if tensors is None:
                    tensors = [torch.empty(shape, dtype=entry.dtype, device=device) for shape in entry.shapes]
                for tensor in tensors:
                    dist.broadcast(tensor, src=pp_ranks[entry.owner], group=pp_group)
            elif layout.tp_rank == 0 and entry.owner != 0:
                if pp_rank == entry.owner:
                    for tensor in tensors:
                        dist.send(tensor.contiguous(), dst=pp_ranks[0], group=pp_group)
                    tensors = None
                elif pp_rank == 0:
                    tensors = [torch.empty(shape, dtype=entry.dtype, device=device) for shape in entry.shapes]
                    for tensor in tensors:
                        dist.recv(tensor, src=pp_ranks[entry.owner], group=pp_group)
        if receives and tensors is not None:
            yield from zip(entry.names, tensors)
