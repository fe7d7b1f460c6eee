"""OLMoE: Llama attention with RMSNorm over the whole q and k projections (all heads at once, not per
head: a norm layer we supply, sharded with the heads under TP); softmax top-k routing."""

from .base import MoEDecoder, register


@register
class Olmoe(MoEDecoder):
    model_types = ("olmoe",)

    def softmax_weights_dtype(self) -> str:
        return "model"  # float32 softmax and renormalisation, weights cast to the logits' dtype

    def qk_layernorm(self) -> bool:
        return True

    def qk_norm_over_heads(self) -> bool:
        return True

    def moe_intermediate_size(self) -> int:
        return self.hf.intermediate_size
