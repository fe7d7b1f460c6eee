"""The language models of Qwen2.5-VL and Qwen3-VL: Qwen2 / Qwen3 decoders whose rotary takes three position
components per token (M-RoPE: temporal, height, width). `mcore_transformers.multimodal` puts the vision tower
in front of them; on their own they load as text models."""

from typing import Optional, Sequence

import torch

from ..conversion.rules import ExpertStack, GateUpRows, IfLastDim, OneOf, Row, Rule, TransposedGateUpRows, TransposedRow
from ..errors import UnsupportedModelError
from .base import HF_LAYER, register
from .qwen2 import Qwen2
from .qwen3 import Qwen3
from .qwen3_moe import Qwen3Moe


def _sections(hf, default: Sequence[int], rotary_dim: int) -> list[int]:
    sections = list((getattr(hf, "rope_parameters", None) or {}).get("mrope_section") or default)
    if len(sections) != 3 or sum(sections) != rotary_dim // 2:
        raise UnsupportedModelError(
            f"mrope_section={sections}: M-RoPE needs three sections (temporal, height, width) that add up to half "
            f"the rotary dimension ({rotary_dim // 2})."
        )
    return sections


def consecutive_components(sections: Sequence[int]) -> torch.Tensor:
    """Qwen2-VL / Qwen2.5-VL: the first `t` frequencies follow the temporal position, the next `h` the height,
    the last `w` the width."""
    return torch.cat([torch.full((size,), component) for component, size in enumerate(sections)])


def interleaved_components(sections: Sequence[int]) -> torch.Tensor:
    """Qwen3-VL: frequencies cycle t, h, w (h on 1, 4, 7, ... below 3·h; w on 2, 5, 8, ... below 3·w; the rest t)."""
    index = torch.zeros(sum(sections), dtype=torch.long)
    for component in (1, 2):
        index[component : 3 * sections[component] : 3] = component
    return index


@register
class Qwen2_5_VLText(Qwen2):
    model_types = ("qwen2_5_vl_text", "qwen2_vl_text")

    def rotary_components(self) -> Optional[torch.Tensor]:
        return consecutive_components(_sections(self.hf, (16, 24, 24), self.head_dim))


@register
class Qwen3VLText(Qwen3):
    model_types = ("qwen3_vl_text",)

    def rotary_components(self) -> Optional[torch.Tensor]:
        return interleaved_components(_sections(self.hf, (24, 20, 20), self.head_dim))


@register
class Qwen3VLMoeText(Qwen3Moe, Qwen3VLText):
    """Qwen3-VL-MoE's language model: Qwen3-MoE routing (always renormalised), experts stacked, transposed in the
    hub's files (`experts.gate_up_proj` [E, hidden, 2·I], `experts.down_proj` [E, I, hidden])."""

    model_types = ("qwen3_vl_moe_text",)

    def normalize_top_k(self) -> bool:
        return True

    def expert_rules(self, expert: str, hf_expert: str) -> list[Rule]:
        # transformers' own saves keep its in-memory layout ([E, 2·I, hidden], [E, hidden, I]); it tells the two
        # apart by shape, taking its own layout when the shape fits it (also when square): so do these rules.
        fc1, fc2 = expert + "linear_fc1.weight", expert + "linear_fc2.weight"
        stacked = HF_LAYER + self.hf_stacked_moe + "experts."
        gate_up, down = stacked + "gate_up_proj", stacked + "down_proj"
        return [
            OneOf(
                ExpertStack(IfLastDim(GateUpRows(fc1, gate_up), self.hf.hidden_size)),
                ExpertStack(TransposedGateUpRows(fc1, gate_up)),
            ),
            OneOf(
                ExpertStack(IfLastDim(Row(fc2, down), self.moe_intermediate_size())),
                ExpertStack(TransposedRow(fc2, down)),
            ),
        ]
