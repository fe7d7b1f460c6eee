"""GLM-4 (dense, the 0414 series): each sublayer's output normalised before the residual add
(`post_self_attn_layernorm`, `post_mlp_layernorm`), GLM-style interleaved rotary on part of each head
(`partial_rotary_factor`, 0.5 by default), biases on q/k/v only, gate/up as one tensor (`gate_up_proj`)."""

from ..conversion.rules import Replicated, Rule
from .base import HF_LAYER, LAYER, DecoderArchitecture, register


@register
class Glm4(DecoderArchitecture):
    model_types = ("glm4",)

    def post_sublayer_norms(self) -> bool:
        return True

    def rotary_interleaved(self) -> bool:
        return True

    def qkv_bias(self) -> bool:
        return bool(getattr(self.hf, "attention_bias", False))

    def linear_bias(self) -> bool:
        return False

    def layer_rules(self) -> list[Rule]:
        return super().layer_rules() + [
            Replicated(LAYER + "self_attention.linear_proj.post_norm.weight", HF_LAYER + "post_self_attn_layernorm.weight"),
            Replicated(LAYER + "mlp.linear_fc2.post_norm.weight", HF_LAYER + "post_mlp_layernorm.weight"),
        ]

    def packed_gate_up(self) -> bool:
        return True
