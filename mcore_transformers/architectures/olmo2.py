"""OLMo2 and OLMo3: no norm before attention or the MLP, an RMSNorm on each one's output
before the residual add (`post_attention_layernorm`, `post_feedforward_layernorm`), RMSNorm over the whole q
and k projections (all heads at once), norms that multiply by the weight in float32. OLMo3 adds a sliding window on the layers transformers marks
"sliding_attention", and keeps rotary settings per layer type (one rotary table per distinct setting, see
`DecoderArchitecture.rotary_tables`)."""

from ..conversion.rules import Replicated, Rule
from .base import HF_LAYER, LAYER, DecoderArchitecture, register


@register
class Olmo2(DecoderArchitecture):
    model_types = ("olmo2",)

    def pre_sublayer_norms(self) -> bool:
        return False

    def post_sublayer_norms(self) -> bool:
        return True

    def qk_layernorm(self) -> bool:
        return True

    def qk_norm_over_heads(self) -> bool:
        return True

    def rms_norm_weight_in_float32(self) -> bool:
        return True

    def layer_rules(self) -> list[Rule]:
        return super().layer_rules() + [
            Replicated(LAYER + "self_attention.linear_proj.post_norm.weight", HF_LAYER + "post_attention_layernorm.weight"),
            Replicated(LAYER + "mlp.linear_fc2.post_norm.weight", HF_LAYER + "post_feedforward_layernorm.weight"),
        ]


@register
class Olmo3(Olmo2):
    model_types = ("olmo3",)

    def transformer_config(self) -> dict:
        config = super().transformer_config()
        if self.hf.sliding_window is not None:
            config.update(self.layer_windows([kind == "sliding_attention" for kind in self.hf.layer_types]))
        return config
