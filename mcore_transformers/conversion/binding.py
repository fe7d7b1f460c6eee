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


@dataclass(frozen=True)
class BoundParam:
    """A parameter of one chunk, the rule that lays it out, and the global layer it belongs to."""

    chunk: int
    module: nn.Module
    attr: str
    rule: Rule
    rule_index: int
    layer: Optional[int]

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    @property
    def hf_names(self) -> tuple[str, ...]:
        return self.rule.names(self.layer)[1]

    @property
    def order(self) -> tuple:
        """Position in the HF checkpoint order: embeddings, layers in order, then the head."""
        if self.layer is not None:
            return (1, self.layer, self.rule_index)
        return (0 if self.rule.mcore.startswith("embedding.") else 2, 0, self.rule_index)


def bind_parameters(chunks: Sequence[nn.Module], rules: Sequence[Rule], renames: dict[str, str]) -> list[BoundParam]:
    """Every parameter of every chunk bound to a rule; a parameter no rule covers is an error.

    `renames` maps rule-side suffixes to the names the layer spec actually uses (TE fused norms).
    """
    by_template = {}
    for index, rule in enumerate(rules):
        template = rule.mcore
        for old, new in renames.items():
            if template.endswith(old):
                template = template[: -len(old)] + new
        by_template[template] = (index, rule)

    bound, unmatched = [], []
    for chunk_index, chunk in enumerate(chunks):
        for name, _ in chunk.named_parameters():
            layer, template = None, name
            match = _LAYER_NAME.match(name)
            if match:
                local = int(match.group(1))
                layer = chunk.decoder.layers[local].layer_number - 1
                template = "decoder.layers.{i}." + match.group(2)
            if template not in by_template:
                unmatched.append(name)
                continue
            module_name, _, attr = name.rpartition(".")
            index, rule = by_template[template]
            bound.append(BoundParam(chunk_index, chunk.get_submodule(module_name), attr, rule, index, layer))
    if unmatched:
        raise UnsupportedModelError(
            f"No weight rule covers these megatron parameters: {unmatched[:8]}. The architecture file does not "
            "describe this configuration (e.g. an option that adds weights); it needs a rule for them."
        )
    return bound
