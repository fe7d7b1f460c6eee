"""Phi-3, Phi-3.5 and Phi-4 (dense): Llama's computation, with q/k/v stored as one tensor (`qkv_proj`: all q rows,
then k, then v) and gate/up as one (`gate_up_proj`: gate rows, then up); an optional sliding window; longrope
scaling (long factors past original_max_position_embeddings, see `DecoderArchitecture.long_rope`)."""

from typing import Optional

from ..conversion.rules import PackedQKV, Row, Rule
from ..errors import UnsupportedModelError
from .base import HF_LAYER, LAYER, DecoderArchitecture, register


@register
class Phi3(DecoderArchitecture):
    model_types = ("phi3",)

    def sliding_window(self) -> Optional[int]:
        return getattr(self.hf, "sliding_window", None)

    def transformer_config(self) -> dict:
        for switch in ("resid_pdrop", "embd_pdrop"):
            if float(getattr(self.hf, switch, 0.0) or 0.0):
                raise UnsupportedModelError(
                    f"{switch}={getattr(self.hf, switch)}: Phi-3's residual / embedding dropout is not implemented "
                    f"(megatron-core drops out embeddings and residuals together). Set {switch}=0.0 in the config."
                )
        return super().transformer_config()

    def attention_rules(self) -> list[Rule]:
        attn, hf_attn = LAYER + "self_attention.", HF_LAYER + "self_attn."
        return [
            PackedQKV(attn + "linear_qkv.weight", hf_attn + "qkv_proj.weight"),
            Row(attn + "linear_proj.weight", hf_attn + "o_proj.weight"),
        ]

    def packed_gate_up(self) -> bool:
        return True
