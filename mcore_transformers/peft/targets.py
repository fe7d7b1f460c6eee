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
from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from ..conversion.binding import BoundParam
from ..conversion.loader import expected_hf_shapes
from ..conversion.rules import ShardLayout
from .compat import install_conversion_guard
from .errors import AdapterError
from .fused import in_memory_stack
from .slots import Projection, ProjectionSlot
from .view import LoraView, ViewNode, find_view

_LABEL_STRIDE = 1 << 40  # label = tensor index · stride + row (or column) index


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
    if item.rule.stacked:  # the rule lays out one expert's slice of the stacked tensor
        shapes = tuple(shape[1:] for shape in shapes)
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


class _SameLayoutCache:
    """`derive_projections` once per rule and local shape: the layers of a model differ only in their names."""

    def __init__(self):
        self._found: dict[tuple, list[Projection]] = {}

    def __call__(self, item: BoundParam, layout: ShardLayout) -> list[Projection]:
        key = (id(item.rule), tuple(item.param.shape))  # the rules live as long as the model's binding
        if key not in self._found:
            self._found[key] = derive_projections(item, layout)
        # one projection per HF name, in order (the index tensors are shared: nothing writes to them)
        return [
            replace(p, path=name.removesuffix(".weight")) for p, name in zip(self._found[key], item.hf_names)
        ]


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


def stacked_expert_projections(item: BoundParam, rule, layout: ShardLayout) -> Optional[list[Projection]]:
    """Experts stacked on disk too, with no per-expert HF names (granitemoe's `input_linear`): one projection per
    expert and stacked tensor, the whole [out, in] slice, named `...experts.{e}.<tensor>` after transformers'
    in-memory tensor (`...experts.gate_up_proj`). That is exactly what peft adapts there through
    `target_parameters` (one LoRA per expert, A_e and B_e; see fused.py). None when the family has no in-memory
    `experts` tensor or its slice is not the linear's [out, in] (transposed experts: gpt_oss)."""
    in_memory = [alt for alt in getattr(rule, "alternatives", (rule,)) if in_memory_stack(alt)]
    if not in_memory or item.expert is None:
        return None
    try:
        projections = derive_projections(replace(item, rule=in_memory[0]), layout)
    except (ValueError, RuntimeError, NotImplementedError):
        return None
    if len(projections) != 1:
        return None
    projection = projections[0]
    out_features, in_features = projection.shape
    local_out, local_in = item.param.shape
    fits = (in_features == local_in and projection.hf_index.numel() == local_out if projection.split_dim == 0
            else out_features == local_out and projection.hf_index.numel() == local_in)
    if not fits:
        return None
    module, tensor = projection.path.rsplit(".", 1)
    return [replace(projection, path=f"{module}.{item.expert}.{tensor}")]


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
    derived = _SameLayoutCache()
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
                projections = stacked_expert_projections(item, rules[item.rule_index], layout)
                if projections is None:
                    raise ValueError(NO_PER_EXPERT_NAMES)
                view.parameter_slots += [p.path for p in projections]
            else:
                projections = [
                    replace(p, path=model.arch.module_path(p.path)) for p in derived(placed, layout)
                ]
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
            node, leaf = _parent_node(view, model, projection.path)
            node.add_module(leaf, ProjectionSlot(host, projection, unsupported))
            host.parts.append((node, leaf, projection))
        host.finish()
        view.hosts.append(host)
    _expose(view, model)
    for name, root in view.roots.items():
        root.__dict__["lora_view"] = view
        model.add_module(name, root)
    if view.exposed:
        _put_view_first(view, model)
    return view


def _parent_node(view: LoraView, model: nn.Module, path: str) -> tuple[ViewNode, str]:
    """The view node that holds `path`'s last component (made as needed), and that component."""
    *parents, leaf = path.split(".")
    if parents[0] not in view.roots:
        if parents[0] in model._modules or hasattr(model, parents[0]):
            raise AdapterError(f"Cannot add the HF-named LoRA view: the model already has an attribute {parents[0]!r}.")
        view.roots[parents[0]] = ViewNode()
    node = view.roots[parents[0]]
    for part in parents[1:]:
        node = node.child(part)
    return node, leaf


def _expose(view: LoraView, model: nn.Module) -> None:
    """Hang the model's own transformers modules (`_lora_exposed_modules`, e.g. a vision tower) into the view
    under their HF paths. peft then adapts their nn.Linears with its stock layers, under HF's names."""
    exposed = getattr(model, "_lora_exposed_modules", dict)()
    for path, module in exposed.items():
        hidden = next(name for name, found in model.named_modules(remove_duplicate=False) if found is module)
        node, leaf = _parent_node(view, model, path)
        node.add_module(leaf, module)
        view.exposed[path] = (module, hidden)
        view.exposed_linear_names |= {
            name.rsplit(".", 1)[-1] for name, child in module.named_modules() if isinstance(child, nn.Linear)
        }


def _put_view_first(view: LoraView, model: nn.Module) -> None:
    """`named_modules()` / `named_parameters()` yield a module once, under its first path: the view comes first so
    that peft finds (and names) an exposed module under its HF path. `state_dict()` lists every path, so the
    module's other path (under the chunks) is left out of it, and of what `load_state_dict` reports missing."""
    modules = dict(model._modules)
    model._modules.clear()
    model._modules.update({name: modules[name] for name in view.roots})
    model._modules.update({name: module for name, module in modules.items() if name not in view.roots})
    hidden = [f"{path}." for _, path in view.exposed.values()]

    def drop_hidden(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(tuple(prefix + h for h in hidden))]:
            del state_dict[key]

    def forgive_hidden(module, incompatible_keys):
        missing = incompatible_keys.missing_keys
        missing[:] = [key for key in missing if not any(f".{h}" in f".{key}" for h in hidden)]

    view.hook_handles = [
        model.register_state_dict_post_hook(drop_hidden),
        model.register_load_state_dict_post_hook(forgive_hidden),
    ]


def detach(model: nn.Module) -> None:
    """Remove the view and restore the megatron linears' own forward. Refused while LoRA layers are attached."""
    view = find_view(model)
    if view is None:
        return
    attached = [path for path, module in view.slots() if not isinstance(module, ProjectionSlot)]
    attached += [path for path, _ in view.exposed_lora_layers()]
    if attached:
        raise AdapterError(f"LoRA layers are still attached ({attached[:3]} ...): unload() or merge_and_unload() first.")
    for host in view.hosts:
        host.uninstall()
    for handle in view.hook_handles:
        handle.remove()
    for name in view.roots:
        del model._modules[name]
