"""Rotary settings as transformers computes them, read from an HF config: the part of `DecoderArchitecture` that
answers "which inverse frequencies, for which layers, with which attention factor".

transformers' own rope init functions compute the frequencies (so every rope type it knows is exact); configs that
keep rotary settings per layer type (`layer_types` with a `rope_parameters` entry each: Gemma 3, OLMo3) get one
table per distinct setting. The engine reads `rotary_tables()`, `long_rope()` and `softmax_scale()`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import UnsupportedModelError

ROPE_TYPES = ("default", "linear", "llama3", "proportional", "yarn", "longrope")


class RotarySettings:
    """Mixin of `DecoderArchitecture`: needs `self.hf` (the HF config) and `self.head_dim`."""

    def rope(self, layer_type: Optional[str] = None) -> torch.Tensor:
        """Rotary inverse frequencies exactly as transformers computes them for this config (for the layers of
        `layer_type` where the config keeps rotary settings per layer type)."""
        return self._rope(layer_type)[0]

    def rotary_tables(self) -> tuple[list[torch.Tensor], Optional[list[int]]]:
        """The rotary inverse-frequency tables, and per layer (global index) the one it rotates by; None when every
        layer uses the first. Layer types with the same settings share a table (one table: the engine's plain path)."""
        types = self.rope_layer_types()
        if types is None:
            return [self.rope()], None
        kinds = list(dict.fromkeys(types))  # one representative per distinct setting, in order of first use
        distinct = [kind for i, kind in enumerate(kinds)
                    if all(self.rope_parameters(kind) != self.rope_parameters(k) for k in kinds[:i])]
        if len(distinct) == 1:
            return [self.rope(distinct[0])], None
        if self.long_rope() is not None:
            raise UnsupportedModelError(
                "longrope rotary on a config with rotary settings per layer type: the switch to the long factors is "
                "implemented for one rotary table only."
            )
        table_of = {kind: next(i for i, d in enumerate(distinct) if self.rope_parameters(d) == self.rope_parameters(kind))
                    for kind in kinds}
        self.rope_attention_factor()  # refuses factors that differ per layer type
        return [self.rope(kind) for kind in distinct], [table_of[kind] for kind in types]

    def long_rope(self) -> Optional[tuple[int, torch.Tensor]]:
        """(length, inverse frequencies) that replace `rope()` in a forward whose positions reach past `length`:
        longrope's long factors past original_max_position_embeddings, chosen per forward call from its largest
        position, as transformers does. None: one set of frequencies for every length."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        types = self.rope_layer_types() or [None]
        longrope = [kind for kind in dict.fromkeys(types) if self.rope_parameters(kind).get("rope_type") == "longrope"]
        if not longrope:
            return None
        params = self.rope_parameters(longrope[0])
        length = params.get("original_max_position_embeddings") or self.hf.original_max_position_embeddings
        inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](
            self.hf, torch.device("cpu"), seq_len=length + 1, **self._layer_type(longrope[0])
        )
        return int(length), inv_freq

    def rope_layer_types(self) -> Optional[list[str]]:
        """Per layer, the key of its rotary settings in `rope_parameters`, for configs that keep one set per layer
        type (transformers' `layer_types`: Gemma 3, OLMo3); None: `rope_parameters` is one set for every layer."""
        params = getattr(self.hf, "rope_parameters", None) or {}
        types = getattr(self.hf, "layer_types", None)
        if types and all(isinstance(params.get(kind), dict) for kind in types):
            return list(types)
        return None

    def rope_parameters(self, layer_type: Optional[str] = None) -> dict:
        """The rotary settings (of the layers of `layer_type`; None: of the first layer)."""
        params = getattr(self.hf, "rope_parameters", None) or {}
        types = self.rope_layer_types()
        return params if types is None else params[layer_type or types[0]]

    def _layer_type(self, layer_type: Optional[str] = None) -> dict:
        """transformers' rope init functions' `layer_type` argument, where the config keeps settings per layer type."""
        types = self.rope_layer_types()
        return {} if types is None else {"layer_type": layer_type or types[0]}

    def rope_attention_factor(self) -> float:
        """The factor transformers multiplies cos and sin by (YaRN's mscale; 1 for most rope types), the same on every
        layer: one softmax scale holds it (refused when layer types differ)."""
        types = self.rope_layer_types()
        factors = {kind: self._rope(kind)[1] for kind in dict.fromkeys(types or [None])}
        if len(set(factors.values())) > 1:
            raise UnsupportedModelError(
                f"rotary attention factors differ between layer types ({factors}): megatron-core has one softmax scale "
                "for every layer."
            )
        return next(iter(factors.values()))

    def softmax_scale(self) -> Optional[float]:
        """The attention score scale, when the rope changes it (None: 1/sqrt(head_dim)).

        transformers multiplies cos and sin by the rope's attention factor (YaRN's mscale), so every
        q·k grows by its square; megatron gets the same scores from a larger softmax scale.
        """
        scaling = self.rope_attention_factor()
        return None if scaling == 1.0 else scaling**2 / math.sqrt(self.head_dim)

    def _rope(self, layer_type: Optional[str] = None) -> tuple[torch.Tensor, float]:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = self.rope_parameters(layer_type)
        rope_type = params.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type={rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})."
            )
        if rope_type == "default":
            base = params.get("rope_theta", getattr(self.hf, "rope_theta", 10000.0))
            dim = int(self.head_dim * params.get("partial_rotary_factor", 1.0))
            return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](
            self.hf, torch.device("cpu"), **self._layer_type(layer_type)
        )
        return inv_freq, float(attention_scaling)
