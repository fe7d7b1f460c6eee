"""Weight rule types: how one mcore parameter relates to one or more HF tensors, in both directions.

A rule is pure layout. `load` builds this rank's shard from byte-range reads of the HF tensors;
`export` rebuilds the HF tensors from the shards of every tensor-parallel rank (in rank order).
Architecture files only name things; they never slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch


class TensorSource(Protocol):
    """What a rule reads from: HF tensors by name, whole or as a slice along one dimension."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class ShardLayout:
    """The numbers a rule needs to place bytes: this rank's TP position and the model's head/vocab geometry."""

    tp_rank: int
    tp_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_query_groups: int  # mcore groups: num_key_value_heads, or tp when KV heads are replicated
    head_dim: int
    vocab_size: int
    padded_vocab_size: int

    @property
    def kv_replication(self) -> int:
        return self.num_query_groups // self.num_key_value_heads


def _range(total: int, layout: ShardLayout) -> tuple[int, int]:
    size = total // layout.tp_size
    return layout.tp_rank * size, (layout.tp_rank + 1) * size


@dataclass(frozen=True)
class Rule:
    """One mcore parameter ↔ HF tensors. `{i}` in names stands for the global layer index."""

    mcore: str
    hf: tuple[str, ...]
    tp_dim: Optional[int] = None  # dimension split across TP ranks; None = replicated
    exported: bool = True  # False for copies (a tied output layer) whose source another rule exports

    def names(self, layer: Optional[int]) -> tuple[str, tuple[str, ...]]:
        if layer is None:
            return self.mcore, self.hf
        return self.mcore.format(i=layer), tuple(name.format(i=layer) for name in self.hf)

    def load(self, source: TensorSource, hf_names: Sequence[str], layout: ShardLayout) -> torch.Tensor:
        raise NotImplementedError

    def export(self, shards: Sequence[torch.Tensor], layout: ShardLayout) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class Replicated(Rule):
    """Same tensor on every TP rank (norms, biases of row-parallel layers)."""

    def __init__(self, mcore: str, hf: str, exported: bool = True):
        super().__init__(mcore, (hf,), None, exported)

    def load(self, source, hf_names, layout):
        return source.read(hf_names[0])

    def export(self, shards, layout):
        return (shards[0],)


class Column(Rule):
    """Output features split across TP (column-parallel weight rows, their bias)."""

    def __init__(self, mcore: str, hf: str, exported: bool = True):
        super().__init__(mcore, (hf,), 0, exported)

    def load(self, source, hf_names, layout):
        start, stop = _range(source.shape(hf_names[0])[0], layout)
        return source.read(hf_names[0], 0, start, stop)

    def export(self, shards, layout):
        return (torch.cat(list(shards), 0),)


class Row(Rule):
    """Input features split across TP (row-parallel weight columns)."""

    def __init__(self, mcore: str, hf: str, exported: bool = True):
        super().__init__(mcore, (hf,), 1, exported)

    def load(self, source, hf_names, layout):
        start, stop = _range(source.shape(hf_names[0])[1], layout)
        return source.read(hf_names[0], 1, start, stop)

    def export(self, shards, layout):
        return (torch.cat(list(shards), 1),)


class VocabColumn(Rule):
    """Embedding / LM-head rows split across TP, padded to `padded_vocab_size` (pad rows are zero, cut on export)."""

    def __init__(self, mcore: str, hf: str, exported: bool = True):
        super().__init__(mcore, (hf,), 0, exported)

    def load(self, source, hf_names, layout):
        start, stop = _range(layout.padded_vocab_size, layout)
        real_stop = min(stop, layout.vocab_size)
        if start >= real_stop:
            width = source.shape(hf_names[0])[1:]
            return torch.zeros((stop - start, *width), dtype=source.dtype(hf_names[0]))
        rows = source.read(hf_names[0], 0, start, real_stop)
        if real_stop == stop:
            return rows
        return torch.cat([rows, rows.new_zeros((stop - real_stop, *rows.shape[1:]))], 0)

    def export(self, shards, layout):
        return (torch.cat(list(shards), 0)[: layout.vocab_size],)


class FusedQKV(Rule):
    """mcore `linear_qkv` ↔ HF q/k/v: rows grouped per query group as [q heads of g, k_g, v_g].

    TP ranks hold whole groups. When tp exceeds the KV heads, mcore has `num_query_groups = tp`
    groups and each HF KV head is replicated into `kv_replication` consecutive groups.
    """

    def __init__(self, mcore: str, q: str, k: str, v: str):
        super().__init__(mcore, (q, k, v), 0)

    def load(self, source, hf_names, layout):
        q_name, k_name, v_name = hf_names
        d = layout.head_dim
        q_per_group = layout.num_attention_heads // layout.num_query_groups
        first, stop = _range(layout.num_query_groups, layout)
        groups = stop - first
        q = source.read(q_name, 0, first * q_per_group * d, stop * q_per_group * d)
        kv_first = first // layout.kv_replication
        kv_stop = (stop - 1) // layout.kv_replication + 1
        k = source.read(k_name, 0, kv_first * d, kv_stop * d)
        v = source.read(v_name, 0, kv_first * d, kv_stop * d)
        rest = q.shape[1:]
        # HF KV head of each local group, relative to the rows just read.
        pick = torch.tensor([g // layout.kv_replication - kv_first for g in range(first, stop)])
        k = k.reshape(kv_stop - kv_first, d, *rest)[pick]
        v = v.reshape(kv_stop - kv_first, d, *rest)[pick]
        q = q.reshape(groups, q_per_group * d, *rest)
        return torch.cat([q, k, v], 1).reshape(-1, *rest)

    def export(self, shards, layout):
        d = layout.head_dim
        q_per_group = layout.num_attention_heads // layout.num_query_groups
        full = torch.cat(list(shards), 0)
        rest = full.shape[1:]
        grouped = full.reshape(layout.num_query_groups, (q_per_group + 2) * d, *rest)
        q, k, v = grouped.split([q_per_group * d, d, d], 1)
        # Replicated KV copies are identical; the first of each run is the HF head.
        k = k[:: layout.kv_replication]
        v = v[:: layout.kv_replication]
        return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


class FusedGateUp(Rule):
    """mcore `linear_fc1` ↔ HF gate_proj/up_proj: each TP rank holds [gate_r; up_r]."""

    def __init__(self, mcore: str, gate: str, up: str):
        super().__init__(mcore, (gate, up), 0)

    def load(self, source, hf_names, layout):
        gate_name, up_name = hf_names
        start, stop = _range(source.shape(gate_name)[0], layout)
        return torch.cat([source.read(gate_name, 0, start, stop), source.read(up_name, 0, start, stop)], 0)

    def export(self, shards, layout):
        halves = [shard.chunk(2, 0) for shard in shards]
        gate = torch.cat([h[0] for h in halves], 0)
        up = torch.cat([h[1] for h in halves], 0)
        return gate, up
