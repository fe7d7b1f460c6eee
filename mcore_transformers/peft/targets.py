"""The HF projections peft sees, as named slots over megatron-core linears.

peft finds LoRA targets by module name. The facade therefore carries a parameter-free tree of
HF-named modules (`model.layers.3.self_attn.q_proj`, `...mlp.down_proj`, ...). Each leaf, a
`ProjectionSlot`, stands for one HF projection computed inside one megatron linear (q/k/v inside
`linear_qkv`, gate/up inside `linear_fc1`) and records which of the projection's rows
(column-parallel linear) or columns (row-parallel linear) this rank holds, and where they sit in
the local weight. That placement is derived from the weight rule that loads the checkpoint: the
rule "loads" index labels instead of weights, so no layout is written twice, and a new rule type
(routed experts, ...) brings its LoRA placement with it.

Because the leaves are named like HF modules, peft's matching (`q_proj`, `all-linear`, full
paths, `layers_to_transform`) and its adapter state-dict keys
(`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`) are exactly HF's.
When peft puts its LoRA layer in place of a slot, the containing `ViewNode` adopts it (see
`layers.adopt`); the megatron linear then runs base and LoRA together (`host.LoraHost`).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from ..conversion.binding import BoundParam
from ..conversion.loader import expected_hf_shapes
from ..conversion.rules import ShardLayout
from .compat import install_conversion_guard
from .errors import AdapterError

_LABEL_STRIDE = 1 << 40  # label = tensor index · stride + row (or column) index


@dataclass(frozen=True, eq=False)
class Projection:
    """One HF projection inside a megatron linear, as far as this rank holds it."""

    path: str  # HF module path, e.g. "model.layers.3.self_attn.q_proj"
    shape: tuple[int, int]  # HF weight shape (out_features, in_features)
    split_dim: int  # 0: output rows (column-parallel linear); 1: input columns (row-parallel linear)
    hf_index: torch.Tensor  # HF rows (split_dim 0) / columns (1) this rank holds, in local order
    local_index: torch.Tensor  # their positions along split_dim of the local megatron weight

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]


class _LabelSource:
    """A rule's TensorSource whose tensors are labels: loading them shows where every HF row lands.

    Tensors are thin (one column, or one row for row-parallel rules), so this costs a few vectors.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], split_dim: int):
        self._shapes = shapes
        self._number = {name: i for i, name in enumerate(shapes)}
        self._split_dim = split_dim

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return torch.int64

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        size = self._shapes[name][self._split_dim]
        labels = torch.arange(size, dtype=torch.int64) + self._number[name] * _LABEL_STRIDE
        labels = labels.view(-1, 1) if self._split_dim == 0 else labels.view(1, -1)
        if dim is None:
            return labels
        if dim != self._split_dim:
            raise ValueError(f"rule reads {name} along dim {dim}, not the split dim {self._split_dim}")
        return labels.narrow(dim, start, (size if stop is None else stop) - start)


def derive_projections(item: BoundParam, layout: ShardLayout) -> list[Projection]:
    """The HF projections inside `item` (a linear's weight) and where this rank's part of each sits."""
    names = item.hf_names
    shapes = expected_hf_shapes(item, layout)
    split_dim = 1 if item.rule.tp_dim == 1 else 0
    labels = item.rule.load(_LabelSource(dict(zip(names, shapes)), split_dim), names, layout).reshape(-1)
    if labels.numel() != item.param.shape[split_dim]:
        raise ValueError(f"{item.rule.mcore}: labels do not cover the local weight")
    which, index = labels // _LABEL_STRIDE, labels % _LABEL_STRIDE
    projections = []
    for number, (name, shape) in enumerate(zip(names, shapes)):
        held = which == number
        projections.append(
            Projection(
                path=name.removesuffix(".weight"),
                shape=(int(shape[0]), int(shape[1])),
                split_dim=split_dim,
                hf_index=index[held].clone(),
                local_index=held.nonzero().flatten(),
            )
        )
    return projections


GROUPED_EXPERT_WEIGHT = re.compile(r"weight\d+")  # grouped-GEMM experts: one `weight<e>` per local expert
GROUPED_REFUSED = (
    "LoRA on grouped-GEMM experts (Transformer Engine's TEGroupedLinear, the GPU layer spec) is not supported yet: "
    "per-expert LoRA runs in megatron-core's SequentialMLP experts (the local, non-TE spec)."
)
NO_PER_EXPERT_NAMES = (
    "this family's checkpoints have no per-expert projections (its experts are stored fused), so there is no HF "
    "per-expert LoRA naming for them; LoRA on its routed experts is not supported."
)


def per_expert_item(item: BoundParam, rule) -> Optional[BoundParam]:
    """`item` (bound to a stacked-expert rule) bound instead to the per-expert layout of the same parameter."""
    for alternative in getattr(rule, "alternatives", ()):
        if alternative.expert and not alternative.stacked:
            return replace(item, rule=alternative)
    return None


def _linear_kind(linear: nn.Module) -> tuple[Optional[str], Optional[str]]:
    """("column" | "row", None) for a supported megatron linear, (None, why not) for another linear."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(linear, ColumnParallelLinear):
        return "column", None
    if isinstance(linear, RowParallelLinear):
        return "row", None
    return None, (
        f"LoRA on {type(linear).__name__} (a Transformer Engine or grouped-GEMM linear) is not supported yet: "
        "the LoRA layers wrap megatron-core's local ColumnParallelLinear / RowParallelLinear."
    )


class ProjectionSlot(nn.Linear):
    """What peft sees of one HF projection: its name, its HF shape, no weights of its own.

    It is an `nn.Linear` so that peft's own dispatch (and `target_modules="all-linear"`) picks it;
    the LoRA layer peft builds around it is then adopted by the containing `ViewNode`. `weight` is a
    zero tensor of the HF shape that owns no memory (an expanded scalar): it tells peft the device
    and dtype, and code that would read the real weight through it reads zeros instead.
    """

    def __init__(self, host, projection: Projection, unsupported: Optional[str] = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = projection.shape
        # Plain attributes (not submodules): the megatron linear belongs to the chunks, not to this view.
        self.__dict__.update(host=host, projection=projection, unsupported=unsupported)

    @property
    def weight(self) -> torch.Tensor:
        base = self.host.linear.weight
        return base.new_zeros(()).expand(self.out_features, self.in_features)

    @property
    def bias(self) -> None:
        return None

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"{self.projection.path} is a named view for peft; its output is computed inside the megatron linear "
            f"{self.host.name}. Call the model, not this module."
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, computed_in={self.host.name}"


class ViewNode(nn.Module):
    """A parameter-free container of the HF-named view. LoRA layers peft places here are adopted."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, nn.Module) and not isinstance(value, (ViewNode, ProjectionSlot)) and name in self._modules:
            from .layers import adopt  # peft is only imported once peft itself put a layer here

            value = adopt(value)
        super().__setattr__(name, value)

    def __getitem__(self, key):  # `view.layers[3]`, as on an HF model
        return self._modules[str(key)]

    def child(self, name: str) -> "ViewNode":
        if name not in self._modules:
            self.add_module(name, ViewNode())
        return self._modules[name]

    def forward(self, *args, **kwargs):
        raise RuntimeError("The HF-named LoRA view has no forward pass: call the model.")


class LoraView:
    """Everything LoRA support attaches to one facade: the named roots and the hosts behind them."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)
        self.roots: dict[str, ViewNode] = {}
        self.hosts: list = []
        self._checked: dict[str, int] = {}  # adapter name -> id of the config that passed the checks
        self.unplaced: dict[str, str] = {}  # megatron linear (template) -> why it has no HF-named slots

    @property
    def model(self) -> nn.Module:
        return self._model()

    def slots(self):
        """(HF path, current module) for every projection on this rank: a slot or its LoRA layer."""
        for host in self.hosts:
            for node, name, projection in host.parts:
                yield projection.path, node._modules[name]

    def check_configs(self) -> None:
        """Refuse configs peft accepted but that cannot run here (checked once per config object)."""
        configs = getattr(self.model, "peft_config", None) or {}
        for adapter, config in configs.items():
            if self._checked.get(adapter) != id(config):
                from .layers import check_lora_config

                check_lora_config(config, adapter, self.projection_names(), self.unplaced)
                self._checked[adapter] = id(config)

    def projection_names(self) -> set[str]:
        return {host_part[2].name for host in self.hosts for host_part in host.parts}


def find_view(model: nn.Module) -> Optional[LoraView]:
    for module in model._modules.values():
        if isinstance(module, ViewNode) and "lora_view" in module.__dict__:
            return module.__dict__["lora_view"]
    return None


def attach(model: nn.Module) -> LoraView:
    """Add the HF-named view of `model`'s decoder linears (idempotent). Cheap: no parameters, no copies."""
    from .host import LoraHost

    view = find_view(model)
    if view is not None:
        return view
    if not hasattr(model, "_bound") or not hasattr(model, "shard_layout"):
        raise AdapterError(
            f"enable() takes an MCoreModelForCausalLM (got {type(model).__name__}): call it on the model before "
            "get_peft_model / PeftModel.from_pretrained."
        )
    install_conversion_guard()  # peft must not turn per-expert names into transformers 5's fused targets
    view = LoraView(model)
    layout: ShardLayout = model.shard_layout
    rules = None
    for item in sorted(model._bound, key=lambda item: item.order):  # HF order: q, k, v, o, gate, up, down
        grouped = item.rule.expert and GROUPED_EXPERT_WEIGHT.fullmatch(item.attr) is not None
        if (item.attr != "weight" and not grouped) or item.layer is None or getattr(item, "is_buffer", False):
            continue
        if item.param.dim() != 2 or "Linear" not in type(item.module).__name__:
            continue  # routers and other non-linear weights are not LoRA targets
        kind, unsupported = _linear_kind(item.module)
        if grouped:
            kind, unsupported = None, GROUPED_REFUSED
        placed = item
        if item.rule.stacked:
            # Stacked checkpoint (transformers 5's fused experts): LoRA is per expert all the same, so the
            # slots come from the per-expert layout of the same parameter (`mlp.experts.{e}.gate_proj`).
            rules = rules if rules is not None else model.arch.rules()
            placed = per_expert_item(item, rules[item.rule_index])
        try:
            if placed is None:
                raise ValueError(NO_PER_EXPERT_NAMES)
            projections = derive_projections(placed, layout)
        except (ValueError, RuntimeError, NotImplementedError) as err:
            kind, unsupported = None, f"LoRA placement for {item.rule.mcore} could not be derived from its rule: {err}"
            projections = []
            view.unplaced.setdefault(item.rule.mcore.removesuffix(".weight"), unsupported)
        expected_dim = {"column": 0, "row": 1}.get(kind)
        if kind is not None and any(p.split_dim != expected_dim for p in projections):
            kind, unsupported = None, f"{item.rule.mcore} is split along a dimension its linear type does not split."
        if kind == "row" and len(projections) != 1:
            kind, unsupported = None, f"{item.rule.mcore}: a row-parallel linear holding several HF projections."
        name = item.rule.mcore.format(i=item.layer, e=getattr(item, "expert", None)).removesuffix(".weight")
        host = LoraHost(item.module, kind, name, view)
        for projection in projections:
            *parents, leaf = projection.path.split(".")
            if parents[0] not in view.roots:
                if parents[0] in model._modules or hasattr(model, parents[0]):
                    raise AdapterError(
                        f"Cannot add the HF-named LoRA view: the model already has an attribute {parents[0]!r}."
                    )
                view.roots[parents[0]] = ViewNode()
            node = view.roots[parents[0]]
            for part in parents[1:]:
                node = node.child(part)
            node.add_module(leaf, ProjectionSlot(host, projection, unsupported))
            host.parts.append((node, leaf, projection))
        host.finish()
        view.hosts.append(host)
    for name, root in view.roots.items():
        root.__dict__["lora_view"] = view
        model.add_module(name, root)
    return view


def detach(model: nn.Module) -> None:
    """Remove the view and restore the megatron linears' own forward. Refused while LoRA layers are attached."""
    view = find_view(model)
    if view is None:
        return
    attached = [path for path, module in view.slots() if not isinstance(module, ProjectionSlot)]
    if attached:
        raise AdapterError(f"LoRA layers are still attached ({attached[:3]} ...): unload() or merge_and_unload() first.")
    for host in view.hosts:
        host.uninstall()
    for name in view.roots:
        del model._modules[name]
