"""Bind each parameter of this rank's mcore chunks to the rule (and global layer) that describes it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .rules import Rule

_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Routed experts, local index first: SequentialMLP (`local_experts.3.linear_fc1.weight`) and
# grouped GEMM (`linear_fc1.weight3`) both bind to the template `local_experts.{e}.linear_fc1.weight`.
_SEQUENTIAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")
EXPERT_TEMPLATE = "mlp.experts.local_experts.{e}."


@dataclass(frozen=True)
class BoundParam:
    """A parameter (or persistent buffer) of one chunk, its rule, global layer and global expert."""

    chunk: int
    module: nn.Module
    attr: str
    rule: Rule
    rule_index: int
    layer: Optional[int]
    expert: Optional[int] = None  # global index of the routed expert this tensor belongs to
    is_buffer: bool = False  # a persistent buffer (the router's expert bias), not a parameter

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    @property
    def hf_names(self) -> tuple[str, ...]:
        return self.rule.names(self.layer, self.expert)[1]

    @property
    def order(self) -> tuple:
        """Position in the HF checkpoint order: embeddings, layers in order (experts in order), then the head."""
        if self.layer is not None:
            return (1, self.layer, self.rule_index, -1 if self.expert is None else self.expert)
        return (0 if self.rule.mcore.startswith("embedding.") else 2, 0, self.rule_index, -1)


def _expert_template(chunk: nn.Module, local_layer: int, rest: str) -> tuple[str, Optional[int]]:
    """`rest` with a routed expert's local index replaced by `{e}`, and that expert's global index."""
    for pattern, build in (
        (_SEQUENTIAL_EXPERT, lambda m: (EXPERT_TEMPLATE + m.group(2), int(m.group(1)))),
        (_GROUPED_EXPERT, lambda m: (EXPERT_TEMPLATE + f"{m.group(1)}.{m.group(2)}", int(m.group(3)))),
    ):
        match = pattern.match(rest)
        if match:
            template, local = build(match)
            # MoELayer lists its experts' global indices: local + (num_experts / ep) · ep_rank.
            return template, chunk.decoder.layers[local_layer].mlp.local_expert_indices[local]
    return rest, None


def _persistent_buffers(chunk: nn.Module):
    for module_name, module in chunk.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer


def bind_parameters(
    chunks: Sequence[nn.Module], rules: Sequence[Rule], renames: dict[str, str], available=None
) -> list[BoundParam]:
    """Every parameter (and persistent buffer) of every chunk bound to a rule; one no rule covers is an error.

    `renames` maps rule-side suffixes to the names a layer spec may use instead (TE fuses a norm into
    the next linear). A rule matches either name: TE keeps the norm of an MoE layer as its own module.
    `available` (the checkpoint's tensor names) picks among a rule's alternative HF layouts.
    """
    by_template = {}
    for index, rule in enumerate(rules):
        by_template[rule.mcore] = (index, rule)
        for old, new in renames.items():
            if rule.mcore.endswith(old):
                by_template[rule.mcore[: -len(old)] + new] = (index, rule)

    bound, unmatched = [], []
    for chunk_index, chunk in enumerate(chunks):
        tensors = [(name, False) for name, _ in chunk.named_parameters()]
        tensors += [(name, True) for name, _ in _persistent_buffers(chunk)]
        for name, is_buffer in tensors:
            layer, expert, template = None, None, name
            match = _LAYER_NAME.match(name)
            if match:
                local = int(match.group(1))
                layer = chunk.decoder.layers[local].layer_number - 1
                rest, expert = _expert_template(chunk, local, match.group(2))
                template = "decoder.layers.{i}." + rest
            if template not in by_template:
                unmatched.append(name)
                continue
            module_name, _, attr = name.rpartition(".")
            index, rule = by_template[template]
            rule = rule.resolve(layer, expert, available)
            if rule.expert != (expert is not None):
                unmatched.append(name)
                continue
            module = chunk.get_submodule(module_name)
            bound.append(BoundParam(chunk_index, module, attr, rule, index, layer, expert, is_buffer))
    if unmatched:
        raise UnsupportedModelError(
            f"No weight rule covers these megatron parameters: {unmatched[:8]}. The architecture file does not "
            "describe this configuration (e.g. an option that adds weights); it needs a rule for them."
        )
    return bound
