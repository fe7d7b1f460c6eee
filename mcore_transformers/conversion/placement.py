"""Where one rank's shard lands in the HF tensors its rule exports, so that each rank can write its own bytes of a
saved file (no gather).

The placement is found by exporting index labels through the rule (as peft's slots are found by loading them):
each shard becomes a thin int64 tensor that numbers its rows (or columns), and `rule.export` of those shards shows,
for every HF row (column), which rank's which row (column) it is. Nothing about a layout is written twice, and a
new rule type brings its placement with it. A rule whose export does more than move rows or columns along the
split dimension (a transpose) gives labels of the wrong shape: it has no placement and its shards are gathered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .rules import Rule, ShardLayout

_STRIDE = 1 << 40  # label = shard rank · stride + index along the split dimension


@dataclass(frozen=True)
class Run:
    """`length` consecutive rows (split dim 0) or columns (split dim 1) of this rank's shard, starting at
    `local_start`, that are HF tensor `tensor`'s rows (columns) from `hf_start` on."""

    tensor: int
    hf_start: int
    local_start: int
    length: int


@dataclass(frozen=True)
class Placement:
    split_dim: int  # 0: the runs are rows (contiguous in the file); 1: columns (one piece per row)
    runs: tuple[Run, ...]


def _thin(shape: Sequence[int], dim: int) -> tuple[int, ...]:
    return tuple(size if axis == dim else 1 for axis, size in enumerate(shape))


def shard_placement(
    rule: Rule, layout: ShardLayout, shard_shape: Sequence[int], hf_shapes: Sequence[Sequence[int]], shard_rank: int
) -> Optional[Placement]:
    """The runs of shard `shard_rank` (of `rule.shard_count(layout)`, each `shard_shape`) inside the HF tensors of
    `hf_shapes` (for stacked experts: one expert's slice), or None when the rule's export is not a pure move of rows
    or columns along its split dimension."""
    dim, count = rule.tp_dim, rule.shard_count(layout)
    if dim not in (0, 1) or dim >= len(shard_shape) or any(dim >= len(shape) for shape in hf_shapes):
        return None
    local = shard_shape[dim]
    labels = [
        (torch.arange(local, dtype=torch.int64) + rank * _STRIDE).view(_thin(shard_shape, dim)) for rank in range(count)
    ]
    try:
        exported = rule.export(labels, layout)
    except (RuntimeError, ValueError, IndexError):
        return None
    if len(exported) != len(hf_shapes):
        return None
    runs = []
    for number, (tensor, shape) in enumerate(zip(exported, hf_shapes)):
        # The bytes of a shard's row (column) must be those of an HF row (column): same sizes off the split dim.
        off_split = [size for axis, size in enumerate(shape) if axis != dim]
        if tuple(tensor.shape) != _thin(shape, dim) or tensor.dtype != torch.int64 or \
                off_split != [size for axis, size in enumerate(shard_shape) if axis != dim]:
            return None
        flat = tensor.reshape(-1)
        rank, index = flat // _STRIDE, flat % _STRIDE
        if bool(((rank < 0) | (rank >= count) | (index >= local)).any()):
            return None
        hf_positions = (rank == shard_rank).nonzero().flatten()
        if hf_positions.numel() == 0:
            continue
        local_positions = index[hf_positions]
        # a run breaks where either position does not step by one
        breaks = ((hf_positions.diff() != 1) | (local_positions.diff() != 1)).nonzero().flatten() + 1
        starts = [0, *breaks.tolist()]
        stops = [*breaks.tolist(), hf_positions.numel()]
        hf_list, local_list = hf_positions.tolist(), local_positions.tolist()
        runs += [Run(number, hf_list[a], local_list[a], b - a) for a, b in zip(starts, stops)]
    return Placement(dim, tuple(runs))

