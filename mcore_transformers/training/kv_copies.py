"""Replicated KV heads trained as the single HF head they stand for.

When tensor parallelism does not divide the KV heads, the model holds `kv_replication` copies of each HF KV
head (mcore query groups, see `building.query_groups_for`), each used by other query heads and often on other
ranks. Left alone every copy would get only its own query heads' share of the gradient and step on its own, so
the copies drift apart and away from transformers. Instead, once per optimizer step:

- `merge_grads` (before the data-parallel reduction): each HF head's gradient is the sum over its copies, all
  tensor-parallel ranks together; the first copy gets it and the others get zero, so norms and clipping count
  the head once, as transformers does;
- `sync_weights` (after the optimizer step): the first copy's new values are written into the other copies.

The first copy is also what export reads (`FusedQKV.export`), so saved folders are the trained HF head.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from ..conversion.rules import ShardLayout

QKV_PARAMETERS = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")


class KVHeadCopies:
    """The trainable `linear_qkv` parameters of this rank and where their K/V copies sit (see module doc)."""

    def __init__(self, chunks: Iterable[nn.Module], layout: ShardLayout):
        self.layout = layout
        self.params = [param for chunk in chunks for name, param in chunk.named_parameters()
                       if name.endswith(QKV_PARAMETERS) and param.requires_grad]
        local = layout.num_query_groups // layout.tp_size
        groups = torch.arange(layout.tp_rank * local, (layout.tp_rank + 1) * local)
        self.heads = groups // layout.kv_replication  # the HF KV head of each local group
        self.first = groups % layout.kv_replication == 0  # the copy that carries the head's gradient and weights
        self.group = ps.get_tensor_model_parallel_group() if layout.tp_size > 1 else None

    @classmethod
    def of(cls, chunks: Iterable[nn.Module], layout: ShardLayout) -> Optional["KVHeadCopies"]:
        """None when every KV head is held once (nothing to merge); else the copies of `chunks`."""
        copies = cls(chunks, layout) if layout.kv_replication > 1 else None
        return copies if copies is not None and copies.params else None

    def _kv_blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        """[local groups, 2 (k, v), head_dim, ...] view of a local linear_qkv tensor (rows per group: q..., k, v)."""
        layout = self.layout
        local = layout.num_query_groups // layout.tp_size
        q_per_group = layout.num_attention_heads // layout.num_query_groups
        grouped = tensor.view(local, q_per_group + 2, layout.head_dim, *tensor.shape[1:])
        return grouped[:, q_per_group:]

    def _sum_over_ranks(self, blocks: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """Per HF KV head, the sum of the `which` local blocks over every tensor-parallel rank."""
        total = blocks.new_zeros((self.layout.num_key_value_heads, *blocks.shape[1:]))
        total.index_add_(0, self.heads[which].to(blocks.device), blocks[which.to(blocks.device)])
        if self.group is not None:
            dist.all_reduce(total, group=self.group)
        return total

    @torch.no_grad()
    def merge_grads(self) -> None:
        """Each HF head's gradient, summed over its copies, on the first copy; zero on the others."""
        everything = torch.ones_like(self.first)
        for param in self.params:
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is None:
                continue
            blocks = self._kv_blocks(grad)
            total = self._sum_over_ranks(blocks, everything)
            blocks.zero_()
            first = self.first.to(blocks.device)
            blocks[first] = total[self.heads[self.first].to(blocks.device)]

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Every copy takes its head's first copy's values (after the optimizer stepped the first copies)."""
        for param in self.params:
            blocks = self._kv_blocks(param.data)
            total = self._sum_over_ranks(blocks, self.first)
            blocks.copy_(total[self.heads.to(blocks.device)])
