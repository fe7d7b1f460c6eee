"""GLM-4.5 / 4.6 / 4.7 (glm4_moe): GQA attention with rotate-half rotary on the first `partial_rotary_factor` of each
head (not GLM-4's interleaved pairs), biases on q/k/v only (`attention_bias`), optional per-head q/k RMSNorm
(`use_qk_norm`); DeepSeek-V3's mixture of experts (sigmoid routing with `e_score_correction_bias`, `n_group` /
`topk_group`, `routed_scaling_factor`, shared experts, dense first `first_k_dense_replace` layers). Experts are stored
one tensor per expert and projection on the hub. Multi-token-prediction layers (`num_nextn_predict_layers`, at
`model.layers.{num_hidden_layers + k}`) are not used by transformers: not loaded, copied through verbatim on save."""

from .base import register
from .deepseek_v3 import DeepseekMoE


@register
class Glm4Moe(DeepseekMoE):
    model_types = ("glm4_moe",)

    def qkv_bias(self) -> bool:
        return bool(getattr(self.hf, "attention_bias", False))

    def linear_bias(self) -> bool:
        return False  # o_proj and the MLPs have no bias whatever attention_bias says

    def qk_layernorm(self) -> bool:
        return bool(getattr(self.hf, "use_qk_norm", False))
