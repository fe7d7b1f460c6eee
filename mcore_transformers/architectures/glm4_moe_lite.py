"""GLM-4.7-Flash (glm4_moe_lite): DeepSeek-V3's multi-latent attention and mixture of experts, with the MLP kind of each
layer listed in `mlp_layer_types` ("dense" / "sparse") instead of `first_k_dense_replace` (which transformers ignores
for this family). Its latent norms keep RMSNorm's default epsilon (1e-6) where the config's `rms_norm_eps` is 1e-5, as
in transformers. Multi-token-prediction layers are not loaded and are copied through verbatim on save."""

from .base import register
from .deepseek_v3 import DeepseekV3


@register
class Glm4MoeLite(DeepseekV3):
    model_types = ("glm4_moe_lite",)

    def is_moe_layer(self, layer: int) -> bool:
        return self.hf.mlp_layer_types[layer] == "sparse"
