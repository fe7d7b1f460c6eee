"""Weight rule types: how one mcore parameter relates to one or more HF tensors, in both directions.

A rule is pure layout. `load` builds this rank's shard from byte-range reads of the HF tensors;
`export` rebuilds the HF tensors from the shards of every tensor-parallel rank (in rank order).
Architecture files only name things; they never slice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Optional, Protocol, Sequence

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
    etp_rank: int = 0  # position in the expert-tensor-parallel group, which shards routed experts
    etp_size: int = 1
    num_experts: int = 0  # routed experts per MoE layer (the length of a stacked expert tensor)

    @property
    def kv_replication(self) -> int:
        return self.num_query_groups // self.num_key_value_heads

    def for_experts(self) -> "ShardLayout":
        """The layout routed experts see: their tensor-parallel group is the expert-TP group."""
        return replace(self, tp_rank=self.etp_rank, tp_size=self.etp_size)


class InMemorySource:
    """A TensorSource over full tensors held in memory (gathered, or computed), for `Rule.load`."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        tensor = self.tensors[name]
        if dim is None:
            return tensor
        return tensor.narrow(dim, start, (tensor.shape[dim] if stop is None else stop) - start)


def read_rows(source: TensorSource, pieces: Sequence[tuple[str, int, int]]) -> torch.Tensor:
    """Rows [start:stop) of each (name, start, stop) concatenated along dim 0: the reader's `read_rows`
    (zero-copy or pread, see CheckpointReader.read_rows); `read` + cat for other sources."""
    fast = getattr(source, "read_rows", None)
    if fast is not None:
        return fast(pieces)
    return torch.cat([source.read(name, 0, start, stop) for name, start, stop in pieces], 0)


def _cat(shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """The full tensor from its TP shards; a single shard is returned as it is (no copy)."""
    return shards[0] if len(shards) == 1 else torch.cat(list(shards), dim)


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

    expert: ClassVar[bool] = False  # True: one routed expert's tensor, sharded over expert-TP, placed by EP
    stacked: ClassVar[bool] = False  # True: the HF tensors hold every expert, this one at index [expert]

    def names(self, layer: Optional[int], expert: Optional[int] = None) -> tuple[str, tuple[str, ...]]:
        if layer is None:
            return self.mcore, self.hf
        return self.mcore.format(i=layer, e=expert), tuple(name.format(i=layer, e=expert) for name in self.hf)

    def shard_count(self, layout: ShardLayout) -> int:
        """How many ranks hold a shard of this parameter (the shards `export` takes)."""
        return layout.tp_size if self.tp_dim is not None else 1

    def resolve(self, layer: Optional[int], expert: Optional[int], available) -> "Rule":
        """The rule for the checkpoint at hand (`available`: its tensor names, or None when unknown)."""
        return self

    def fits(self, available, hf_names: Sequence[str]) -> bool:
        """Whether a checkpoint (`available`: its names, or a reader that also knows shapes) stores these tensors
        the way this rule reads them."""
        return all(name in available for name in hf_names)

    def view(self, source: TensorSource, expert: Optional[int]) -> TensorSource:
        """What `load` reads from: the checkpoint itself, or (stacked experts) one expert's slices of it."""
        return source

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


class UnitLeadingDim(Replicated):
    """A replicated tensor that the checkpoint keeps with a leading dimension of one (ERNIE-4.5's `[1, experts]` score
    correction; megatron's buffer is `[experts]`)."""

    def load(self, source, hf_names, layout):
        return source.read(hf_names[0])[0]

    def export(self, shards, layout):
        return (shards[0].unsqueeze(0),)


class Column(Rule):
    """Output features split across TP (column-parallel weight rows, their bias)."""

    def __init__(self, mcore: str, hf: str, exported: bool = True):
        super().__init__(mcore, (hf,), 0, exported)

    def load(self, source, hf_names, layout):
        start, stop = _range(source.shape(hf_names[0])[0], layout)
        return source.read(hf_names[0], 0, start, stop)

    def export(self, shards, layout):
        return (_cat(shards, 0),)


class Row(Rule):
    """Input features split across TP (row-parallel weight columns)."""

    def __init__(self, mcore: str, hf: str, exported: bool = True):
        super().__init__(mcore, (hf,), 1, exported)

    def load(self, source, hf_names, layout):
        start, stop = _range(source.shape(hf_names[0])[1], layout)
        return source.read(hf_names[0], 1, start, stop)

    def export(self, shards, layout):
        return (_cat(shards, 1),)


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
        return (_cat(shards, 0)[: layout.vocab_size],)


class FusedQKV(Rule):
    """mcore `linear_qkv` ↔ HF q/k/v: rows grouped per query group as [q heads of g, k_g, v_g].

    TP ranks hold whole groups. When tp exceeds the KV heads, mcore has `num_query_groups = tp`
    groups and each HF KV head is replicated into `kv_replication` consecutive groups.
    """

    def __init__(self, mcore: str, q: str, k: str, v: str):
        super().__init__(mcore, (q, k, v), 0)

    def _where(self, hf_names, layout) -> tuple[tuple[str, int], ...]:
        """(HF tensor, first row) of the q, k and v rows."""
        return tuple((name, 0) for name in hf_names)

    def load(self, source, hf_names, layout):
        (q_name, q_at), (k_name, k_at), (v_name, v_at) = self._where(hf_names, layout)
        d = layout.head_dim
        q_per_group = layout.num_attention_heads // layout.num_query_groups
        first, stop = _range(layout.num_query_groups, layout)
        pieces = []  # per local group: its q heads, then its HF KV head (replicated groups repeat it)
        for group in range(first, stop):
            kv = group // layout.kv_replication
            pieces += [
                (q_name, q_at + group * q_per_group * d, q_at + (group + 1) * q_per_group * d),
                (k_name, k_at + kv * d, k_at + (kv + 1) * d),
                (v_name, v_at + kv * d, v_at + (kv + 1) * d),
            ]
        return read_rows(source, pieces)

    def export(self, shards, layout):
        d = layout.head_dim
        q_per_group = layout.num_attention_heads // layout.num_query_groups
        full = _cat(shards, 0)
        rest = full.shape[1:]
        grouped = full.reshape(layout.num_query_groups, (q_per_group + 2) * d, *rest)
        q, k, v = grouped.split([q_per_group * d, d, d], 1)
        # Replicated KV copies are identical; the first of each run is the HF head.
        k = k[:: layout.kv_replication]
        v = v[:: layout.kv_replication]
        return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


class PackedQKV(FusedQKV):
    """mcore `linear_qkv` ↔ one HF tensor holding every q row, then the k rows, then the v rows (Phi-3's
    `qkv_proj`): each rank reads its groups' rows of it, export packs the three back."""

    def __init__(self, mcore: str, qkv: str):
        Rule.__init__(self, mcore, (qkv,), 0)

    def _where(self, hf_names, layout):
        q_rows, kv_rows = layout.num_attention_heads * layout.head_dim, layout.num_key_value_heads * layout.head_dim
        return (hf_names[0], 0), (hf_names[0], q_rows), (hf_names[0], q_rows + kv_rows)

    def export(self, shards, layout):
        return (torch.cat(super().export(shards, layout), 0),)


class GateUpRows(Rule):
    """mcore `linear_fc1` ↔ one HF tensor holding the gate rows then the up rows (`gate_up_proj`)."""

    def __init__(self, mcore: str, gate_up: str):
        super().__init__(mcore, (gate_up,), 0)

    def load(self, source, hf_names, layout):
        half = source.shape(hf_names[0])[0] // 2
        start, stop = _range(half, layout)
        return read_rows(source, [(hf_names[0], start, stop), (hf_names[0], half + start, half + stop)])

    def export(self, shards, layout):
        if len(shards) == 1:
            return (shards[0],)
        halves = [shard.chunk(2, 0) for shard in shards]
        return (torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0),)


class TransposedGateUpRows(GateUpRows):
    """`GateUpRows` of an HF tensor stored [in, gate then up] (Qwen3-VL-MoE's experts on disk)."""

    def load(self, source, hf_names, layout):
        tensor = source.read(hf_names[0]).transpose(0, 1)
        half = tensor.shape[0] // 2
        start, stop = _range(half, layout)
        return torch.cat([tensor[start:stop], tensor[half + start : half + stop]], 0).contiguous()

    def export(self, shards, layout):
        return (super().export(shards, layout)[0].transpose(0, 1).contiguous(),)


class InterleavedGateUp(Rule):
    """mcore `linear_fc1` (weight or bias) ↔ one HF tensor whose gate and up alternate along the
    output features (gate at even, up at odd positions), stored [in, out] when `transposed` (GPT-OSS)."""

    def __init__(self, mcore: str, gate_up: str, transposed: bool = False):
        super().__init__(mcore, (gate_up,), 0)
        object.__setattr__(self, "transposed", transposed)

    def load(self, source, hf_names, layout):
        tensor = source.read(hf_names[0])
        tensor = tensor.transpose(0, 1) if self.transposed else tensor
        start, stop = _range(tensor.shape[0] // 2, layout)
        gate, up = tensor[0::2], tensor[1::2]
        return torch.cat([gate[start:stop], up[start:stop]], 0).contiguous()

    def export(self, shards, layout):
        halves = [shard.chunk(2, 0) for shard in shards]
        gate = torch.cat([h[0] for h in halves], 0)
        up = torch.cat([h[1] for h in halves], 0)
        full = torch.stack([gate, up], 1).reshape(-1, *gate.shape[1:])  # gate0, up0, gate1, up1, ...
        return ((full.transpose(0, 1) if self.transposed else full).contiguous(),)


class TransposedRow(Rule):
    """mcore row-parallel weight [out, in / tp] ↔ an HF tensor stored [in, out] (GPT-OSS down_proj)."""

    def __init__(self, mcore: str, hf: str):
        super().__init__(mcore, (hf,), 1)

    def load(self, source, hf_names, layout):
        start, stop = _range(source.shape(hf_names[0])[0], layout)
        return source.read(hf_names[0], 0, start, stop).transpose(0, 1).contiguous()

    def export(self, shards, layout):
        return (torch.cat(list(shards), 1).transpose(0, 1).contiguous(),)


class FusedGateUp(Rule):
    """mcore `linear_fc1` ↔ HF gate_proj/up_proj: each TP rank holds [gate_r; up_r]."""

    def __init__(self, mcore: str, gate: str, up: str):
        super().__init__(mcore, (gate, up), 0)

    def load(self, source, hf_names, layout):
        gate_name, up_name = hf_names
        start, stop = _range(source.shape(gate_name)[0], layout)
        return read_rows(source, [(gate_name, start, stop), (up_name, start, stop)])

    def export(self, shards, layout):
        if len(shards) == 1:
            return tuple(shards[0].chunk(2, 0))
        halves = [shard.chunk(2, 0) for shard in shards]
        gate = torch.cat([h[0] for h in halves], 0)
        up = torch.cat([h[1] for h in halves], 0)
        return gate, up


class Expert(Rule):
    """One routed expert's copy of `inner`: `{e}` in HF names is the global expert index.

    Experts are sharded by the expert-tensor-parallel group (etp), not by TP: `inner` lays the
    tensor out exactly as for a dense weight, seeing the etp rank and size as its TP position.
    Expert parallelism only decides which experts a rank holds (the binding knows), so one
    rule covers every expert on every rank, under both SequentialMLP and grouped-GEMM naming.
    """

    expert: ClassVar[bool] = True

    def __init__(self, inner: Rule):
        super().__init__(inner.mcore, inner.hf, inner.tp_dim, inner.exported)
        object.__setattr__(self, "inner", inner)

    def shard_count(self, layout):
        return self.inner.shard_count(layout.for_experts())

    def fits(self, available, hf_names):
        return self.inner.fits(available, hf_names)

    def load(self, source, hf_names, layout):
        return self.inner.load(source, hf_names, layout.for_experts())

    def export(self, shards, layout):
        return self.inner.export(shards, layout.for_experts())


class ExpertStack(Expert):
    """Routed experts stored stacked, as transformers keeps them in memory (`experts.gate_up_proj`
    [num_experts, 2·I, H], `experts.down_proj` [num_experts, H, I]): slice [e] is expert e laid out
    by `inner`. Each rank reads its own experts' slices; export hands back one expert's slice and
    the exporter stacks them in expert order.
    """

    stacked: ClassVar[bool] = True

    def names(self, layer, expert=None):
        return self.inner.names(layer)

    def view(self, source, expert):
        return _ExpertSlice(source, expert)


class _ExpertSlice:
    """A TensorSource showing each tensor as its slice [expert] (read once per tensor, then cut)."""

    def __init__(self, source: TensorSource, expert: int):
        self.source, self.expert = source, expert
        self._last: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)

    def shape(self, name):
        return self.source.shape(name)[1:]

    def dtype(self, name):
        return self.source.dtype(name)

    def read(self, name, dim=None, start=0, stop=None):
        if self._last[0] != name:
            self._last = (name, self.source.read(name, 0, self.expert, self.expert + 1)[0])
        tensor = self._last[1]
        if dim is None:
            return tensor
        return tensor.narrow(dim, start, (stop if stop is not None else tensor.shape[dim]) - start)


class IfLastDim(Rule):
    """`inner`, for a checkpoint whose tensors end in a dimension of `size`: transformers keeps some tensors under
    one name in two layouts and tells them apart by shape (Qwen3-VL-MoE's experts, transposed on the hub's files,
    as held in memory in transformers' own saves). In a `OneOf`, before the other layout's rule."""

    def __init__(self, inner: Rule, size: int):
        super().__init__(inner.mcore, inner.hf, inner.tp_dim, inner.exported)
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "size", size)

    def fits(self, available, hf_names):
        if not self.inner.fits(available, hf_names):
            return False
        shape = getattr(available, "shape", None)  # names alone (a distributed checkpoint's record): this layout
        return shape is None or all(shape(name)[-1] == self.size for name in hf_names)

    def shard_count(self, layout):
        return self.inner.shard_count(layout)

    def load(self, source, hf_names, layout):
        return self.inner.load(source, hf_names, layout)

    def export(self, shards, layout):
        return self.inner.export(shards, layout)


class OneOf(Rule):
    """One parameter that checkpoints store in different layouts (e.g. per-expert or stacked experts).

    The first alternative whose HF tensors the checkpoint has is used, for loading and for export,
    so a model saves back in the layout it was loaded from. With no checkpoint at hand: the first.
    """

    def __init__(self, *alternatives: Rule):
        first = alternatives[0]
        super().__init__(first.mcore, first.hf, first.tp_dim, first.exported)
        object.__setattr__(self, "alternatives", alternatives)
        object.__setattr__(self, "expert", first.expert)

    def resolve(self, layer, expert, available):
        if available is not None:
            for rule in self.alternatives:
                if rule.fits(available, rule.names(layer, expert)[1]):
                    return rule
        return self.alternatives[0]


def with_hf_names(rule: Rule, rename: Callable[[str], str]) -> Rule:
    """`rule` with its HF tensor names passed through `rename`, layout unchanged: a text decoder nested in a
    bigger checkpoint (a vision-language model keeps it under `model.language_model.`)."""
    renamed = copy.copy(rule)
    object.__setattr__(renamed, "hf", tuple(rename(name) for name in rule.hf))
    if isinstance(rule, (Expert, IfLastDim)):
        object.__setattr__(renamed, "inner", with_hf_names(rule.inner, rename))
    if isinstance(rule, OneOf):
        object.__setattr__(renamed, "alternatives", tuple(with_hf_names(alt, rename) for alt in rule.alternatives))
    return renamed
