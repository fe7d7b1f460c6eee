"""Ranks of one model in lockstep: the model-parallel group, a shared random state, and checks that they agree.

Every rank of a tensor / pipeline-parallel group runs the same Python: the same inputs, the same sampling.
When a script or a trainer gives the ranks different inputs (transformers' Trainer shards batches over every
process), the collective layers would mix rows of different batches without any error; `ranks_agree` lets the
model notice and say so instead.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist


def model_parallel_group():
    """The group of ranks that hold one copy of the model (they must run in lockstep), or None."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


def _group_source(group) -> int:
    return dist.get_process_group_ranks(group)[0]


@contextlib.contextmanager
def sampling_in_lockstep(group):
    """Every rank of `group` draws with the random state of the group's first rank.

    Under tp / pp every rank runs HF's generate loop on identical logits; sampling draws from torch's
    global generator, so the ranks must hold the same generator state or they pick different tokens
    (and the pipeline stalls on mismatched shapes). The first rank's state is broadcast when generate
    starts, so a seed set there reproduces what transformers samples in a single process.
    """
    if group is None:
        yield
        return
    states = [torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None]
    dist.broadcast_object_list(states, src=_group_source(group), group=group)
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1])
    yield


def ranks_agree(tensor: torch.Tensor, group: Optional[object]) -> bool:
    """Whether every rank of `group` holds the same integer tensor (a checksum compared in one all-reduce)."""
    if group is None:
        return True
    ids = tensor.detach().long()
    weights = torch.arange(1, ids.numel() + 1, device=ids.device, dtype=torch.long).view_as(ids) % 1_000_003
    digest = torch.stack([(ids * weights).sum(), ids.sum(), torch.tensor(ids.numel(), device=ids.device)]).double()
    if ids.device.type != "cuda":
        digest = digest.cpu()
    extremes = torch.cat([digest, -digest])  # max of both: the largest and (negated) the smallest value
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    return torch.equal(extremes[:3], -extremes[3:])
