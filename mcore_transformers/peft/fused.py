"""transformers-5 fused expert adapters, read as the per-expert adapters they are.

peft (>= 0.18) on transformers 5 adapts a MoE model's stacked expert tensors directly
(`target_parameters=["gate_up_proj", "down_proj"]`): one `ParamWrapper` per tensor, nested on the
experts module, with A [E·r, in] (expert e's rows: e·r … e·r + r) and B [out, r·E] (expert e's
columns: e, e + E, e + 2E, …, i.e. B.reshape(out, r, E)[..., e]); expert e's delta is
scaling · B_e · A_e in the tensor's own [out, in] layout (peft's swap for non-transposed experts).

That is exactly one LoRA per expert: `gate_up_proj`'s A_e is shared by the expert's gate and up
projections and its B_e splits into their rows; `down_proj`'s is the down projection's. So such an
adapter loads into the per-expert slots exactly: the config is rewritten to target the per-expert
projections of the routed experts only (with peft's rank/alpha for the fused tensor carried over),
and the weights are cut per expert. Which stacked rows are whose is derived from the weight rules
(the stacked and the per-expert layout of the same parameter), not assumed. Experts stacked on disk too
(granitemoe: no per-expert names) have one slot per expert and tensor, the whole slice: A_e and B_e as they are.
Anything outside that (transposed experts, dropout, other parameters, ambiguous shapes) is refused with AdapterError.

`save_adapter` writes such an adapter back in the fused format it came in (`fuse_state`, the inverse cut: copies,
so the same bytes), as long as that format still holds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from .errors import AdapterError

# keys of a fused-expert wrapper: ...experts.lora_A.weight, ...experts.base_layer.lora_A.weight, ...
FUSED_KEY = re.compile(r"^(?P<module>.+\.experts)\.(?P<nest>(?:base_layer\.)*)(?P<kind>lora_A|lora_B)\.weight$")
BASE_PREFIX = "base_model.model."
SOURCE = "mcore_fused_source"  # on a converted LoraConfig: its target_parameters form (plain attribute, not saved)


@dataclass(frozen=True)
class FusedTensor:
    """One stacked expert tensor of the HF model and the per-expert projections it holds."""

    stacked: str  # HF template with {i}: "model.layers.{i}.mlp.experts.gate_up_proj"
    shape: tuple[int, int]  # one expert's slice, (out, in)
    parts: tuple[tuple[str, torch.Tensor], ...]  # (per-expert template with {i} and {e}, its rows of the slice)

    @property
    def leaf(self) -> str:
        return self.stacked.rsplit(".", 1)[-1]


class _RowLabels:
    """A TensorSource whose tensors are row labels (+ a tensor offset), stacked ones with a leading expert dim."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], stacked: bool):
        self._shapes, self._stacked = shapes, stacked
        self._offset = {name: i << 32 for i, name in enumerate(shapes)}

    def shape(self, name):
        return self._shapes[name]

    def dtype(self, name):
        return torch.int64

    def read(self, name, dim=None, start=0, stop=None):
        rows = self._shapes[name][1 if self._stacked else 0]
        labels = torch.arange(rows) + self._offset[name]
        labels = labels.view(1, rows, 1) if self._stacked else labels.view(rows, 1)
        if dim is None:
            return labels
        if dim != 0:
            raise ValueError("row labels are read along dim 0 only")
        return labels.narrow(0, start, (labels.shape[0] if stop is None else stop) - start)


def _meta_item(item, rule, shape):
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
    return replace(item, rule=rule, module=holder, attr="weight")


def fused_tensors(model) -> list[FusedTensor]:
    """The stacked expert tensors this model's rules know, each with the rows of its per-expert projections."""
    from ..conversion.loader import expected_hf_shapes

    rules = model.arch.rules()
    layout = replace(model.shard_layout, etp_rank=0, etp_size=1)  # whole tensors
    found: dict[str, FusedTensor] = {}
    for item in model._bound:
        rule = rules[item.rule_index]
        alternatives = getattr(rule, "alternatives", ())
        per_expert = next((r for r in alternatives if r.expert and not r.stacked), None)
        # transformers' in-memory tensor (on an `experts` module), where the checkpoint's own stacked name differs
        stacked = next((r for r in alternatives if in_memory_stack(r)), None)
        if stacked is None or len(stacked.hf) != 1 or stacked.hf[0] in found:
            continue
        if per_expert is None:  # stacked on disk too (granitemoe): the per-expert slot is the whole slice
            full = expected_hf_shapes(replace(item, rule=stacked), model.shard_layout)[0]
            module, leaf = stacked.hf[0].rsplit(".", 1)
            parts = ((f"{module}.{{e}}.{leaf}", torch.arange(full[1])),)
            found[stacked.hf[0]] = FusedTensor(stacked.hf[0], (int(full[1]), int(full[2])), parts)
            continue
        full = expected_hf_shapes(replace(item, rule=per_expert), model.shard_layout)  # whole HF tensors
        names = per_expert.names(item.layer, item.expert)[1]
        if per_expert.tp_dim == 0:  # column layout: match rows through the local weight both rules build
            local_shape = (sum(shape[0] for shape in full), full[0][1])  # the weight at etp = 1
            mine = per_expert.load(_RowLabels(dict(zip(names, full)), stacked=False), names, layout)
            stacked_names = stacked.names(item.layer, item.expert)[1]
            one = expected_hf_shapes(_meta_item(item, stacked, local_shape), layout)[0]
            source = stacked.view(_RowLabels({stacked_names[0]: one}, stacked=True), 0)
            theirs = stacked.load(source, stacked_names, layout).reshape(-1)
            mine = mine.reshape(-1)
            if mine.numel() != theirs.numel() or theirs.numel() != one[1]:
                continue
            slice_shape = (int(one[1]), int(one[2]))
            parts = []
            for number, name in enumerate(names):
                held = (mine >> 32) == number
                order = torch.argsort(mine[held] & 0xFFFFFFFF)
                parts.append((per_expert.hf[number].removesuffix(".weight"), theirs[held][order].clone()))
        else:  # one projection, the same [out, in] as the stacked slice
            slice_shape = (int(full[0][0]), int(full[0][1]))
            one = expected_hf_shapes(_meta_item(item, stacked, slice_shape), layout)[0]
            if len(names) != 1 or tuple(one[1:]) != slice_shape:
                continue
            parts = [(per_expert.hf[0].removesuffix(".weight"), torch.arange(slice_shape[0]))]
        found[stacked.hf[0]] = FusedTensor(stacked.hf[0], slice_shape, tuple(parts))
    return list(found.values())


def in_memory_stack(rule) -> bool:
    """A stacked-expert rule on transformers' in-memory tensor: one tensor on an `experts` module, as peft keys it."""
    return bool(rule.expert and rule.stacked and len(rule.hf) == 1
                and rule.hf[0].rsplit(".", 1)[0].endswith(".experts"))


def _layer_pattern(template: str) -> str:
    return re.escape(template).replace(r"\{i\}", r"\d+").replace(r"\{e\}", r"\d+")


def convert_config(config, model, num_layers: int) -> None:
    """Rewrite a `target_parameters` config (in place) to target the per-expert projections it adapts."""
    targets = list(getattr(config, "target_parameters", None) or [])
    tensors = fused_tensors(model)
    problems = []
    if getattr(config, "lora_dropout", 0):
        problems.append("lora_dropout")  # peft refuses it on fused tensors too
    if getattr(config, "layers_to_transform", None) is not None or getattr(config, "layers_pattern", None):
        problems.append("layers_to_transform / layers_pattern")
    source_patterns = [dict(getattr(config, field, None) or {}) for field in ("rank_pattern", "alpha_pattern")]
    chosen: dict[str, FusedTensor] = {}
    for target in targets:
        matches = [t for t in tensors if any(
            (name := t.stacked.format(i=i)) == target or name.endswith("." + target) for i in range(num_layers)
        )]
        if not matches:
            problems.append(f"target_parameters entry {target!r} (not a stacked expert tensor this model knows)")
        for tensor in matches:
            chosen[tensor.stacked] = tensor
    if problems or not chosen:
        known = sorted({t.leaf for t in tensors}) or "none: this model's experts have no per-expert HF names"
        raise AdapterError(
            f"Cannot read target_parameters={sorted(targets)} as per-expert LoRA: "
            f"{'; '.join(problems) or 'it targets no stacked expert tensor of this model'}. LoRA on megatron-core "
            f"models adapts HF modules; target_parameters are read only for the stacked routed-expert tensors "
            f"(here: {known}), whose per-expert projections get one LoRA per expert."
        )
    # per-expert projections of the routed experts only: a regex, so shared experts and dense MLPs stay out
    wanted = [_layer_pattern(template) for tensor in chosen.values() for template, _ in tensor.parts]
    existing = config.target_modules
    alternatives = []
    if isinstance(existing, str):
        alternatives.append(existing)
    elif existing:
        names = "|".join(re.escape(t) for t in sorted(existing))
        alternatives.append(rf"(?:.*\.)?(?:{names})")
    alternatives += wanted
    config.target_modules = "|".join(f"(?:{a})" for a in alternatives)
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = dict(getattr(config, field, None) or {})
        for key in list(patterns):
            hit = [t for t in chosen.values()
                   if any(re.match(rf"(.*\.)?({key})$", t.stacked.format(i=i)) for i in range(num_layers))]
            if not hit:
                continue
            value = patterns.pop(key)
            for tensor in hit:
                layers = "|".join(str(i) for i in range(num_layers) if re.match(rf"(.*\.)?({key})$", tensor.stacked.format(i=i)))
                for template, _ in tensor.parts:
                    pattern = _layer_pattern(template).replace(r"\d+", f"(?:{layers})", 1)
                    patterns[pattern] = value
        setattr(config, field, patterns)
    # what the adapter was, so that save_adapter can write it back in that format (`fuse_state`)
    config.__dict__[SOURCE] = {"target_parameters": list(targets), "target_modules": existing,
                               "rank_pattern": source_patterns[0], "alpha_pattern": source_patterns[1]}
    config.target_parameters = None


def is_fused_state(state: dict) -> bool:
    return any(FUSED_KEY.match(key.removeprefix(BASE_PREFIX)) for key in state)


def convert_state(model, state: dict, num_experts: int) -> dict:
    """Cut fused expert LoRA tensors into per-expert HF keys; other keys pass through."""
    tensors = {t.stacked: t for t in fused_tensors(model)}
    by_module: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    converted = {}
    for key, value in state.items():
        match = FUSED_KEY.match(key.removeprefix(BASE_PREFIX))
        if match is None:
            converted[key] = value
            continue
        by_module.setdefault(match["module"], {}).setdefault(match["nest"], {})[match["kind"]] = value
    for module, wrappers in by_module.items():
        layers = _layer_numbers(module)
        if not layers:
            raise AdapterError(f"The fused-expert adapter adapts {module}, which is not in a decoder layer.")
        layer = layers[0]
        candidates = [t for t in tensors.values() if t.stacked.format(i=layer) == f"{module}.{t.leaf}"]
        for nest, pair in wrappers.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise AdapterError(f"The fused-expert adapter has {sorted(pair)} without its pair for {module}.")
            lora_a, lora_b = pair["lora_A"], pair["lora_B"]
            fits = [t for t in candidates if lora_a.shape[1] == t.shape[1] and lora_b.shape[0] == t.shape[0]
                    and lora_a.shape[0] % num_experts == 0 and lora_b.shape[1] == lora_a.shape[0]]
            if len(fits) != 1:
                raise AdapterError(
                    f"Cannot tell which stacked expert tensor of {module} the adapter tensors A {list(lora_a.shape)}, "
                    f"B {list(lora_b.shape)} adapt ({len(fits)} fit): the adapter does not fit this model."
                )
            tensor = fits[0]
            r = lora_a.shape[0] // num_experts
            a = lora_a.reshape(num_experts, r, lora_a.shape[1])
            b = lora_b.reshape(lora_b.shape[0], r, num_experts)
            for e in range(num_experts):
                for template, rows in tensor.parts:
                    path = template.format(i=layer, e=e)
                    converted[f"{BASE_PREFIX}{path}.lora_A.weight"] = a[e].contiguous()
                    converted[f"{BASE_PREFIX}{path}.lora_B.weight"] = b[:, :, e].index_select(0, rows).contiguous()
    return converted


def _layer_numbers(module: str) -> list[int]:
    return [int(n) for n in re.findall(r"\.layers\.(\d+)\.", module + ".")][:1]


def _chosen(tensors: list[FusedTensor], targets, num_layers: int) -> list[FusedTensor]:
    return [t for t in tensors if any(
        (name := t.stacked.format(i=i)) == target or name.endswith("." + target) for target in targets for i in range(num_layers)
    )]


def fuse_state(model, config, state: dict) -> Optional[tuple[dict, list[str]]]:
    """The inverse of `convert_state` for an adapter read from `target_parameters`: the per-expert tensors of each
    adapted stacked tensor put back into peft's fused keys (A [E·r, in], B [out, r·E]), bit for bit, nested as peft
    nests them (the experts module's first parameter, gate_up_proj, innermost: under `base_layer.`). Returns the new
    state and the per-expert paths it folded, or None where the fused format cannot hold the adapter (a projection
    missing, gate and up no longer sharing expert e's A after training, ranks that differ)."""
    source = config.__dict__.get(SOURCE)
    if not source:
        return None
    num_layers = model.language_config.num_hidden_layers
    num_experts = model.shard_layout.num_experts
    chosen = _chosen(fused_tensors(model), source["target_parameters"], num_layers)
    fused, folded = {}, []
    for layer in range(num_layers):
        present = [t for t in chosen if f"{BASE_PREFIX}{t.parts[0][0].format(i=layer, e=0)}.lora_A.weight" in state]
        for position, tensor in enumerate(present):
            module = tensor.stacked.format(i=layer).rsplit(".", 1)[0]
            nest = "base_layer." * (len(present) - 1 - position)
            a_blocks, b_blocks = [], []
            for e in range(num_experts):
                paths = [template.format(i=layer, e=e) for template, _ in tensor.parts]
                keys = [(f"{BASE_PREFIX}{p}.lora_A.weight", f"{BASE_PREFIX}{p}.lora_B.weight") for p in paths]
                if any(a not in state or b not in state for a, b in keys):
                    return None
                lora_a = state[keys[0][0]]
                if any(not torch.equal(state[a], lora_a) for a, _ in keys[1:]):
                    return None
                lora_b = lora_a.new_zeros(tensor.shape[0], lora_a.shape[0])
                for (_, b), (_, rows) in zip(keys, tensor.parts):
                    if state[b].shape != (rows.numel(), lora_a.shape[0]):
                        return None
                    lora_b.index_copy_(0, rows, state[b])
                a_blocks.append(lora_a)
                b_blocks.append(lora_b)
                folded += paths
            if len({a.shape for a in a_blocks}) != 1:
                return None
            fused[f"{BASE_PREFIX}{module}.{nest}lora_A.weight"] = torch.cat(a_blocks).contiguous()
            fused[f"{BASE_PREFIX}{module}.{nest}lora_B.weight"] = torch.stack(b_blocks, -1).flatten(1).contiguous()
    if not folded:
        return None
    kept = {f"{BASE_PREFIX}{p}.lora_{k}.weight" for p in folded for k in "AB"}
    return {**{k: v for k, v in state.items() if k not in kept}, **fused}, folded
