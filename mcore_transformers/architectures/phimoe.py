"""PhiMoE (Phi-3.5-MoE): Mixtral's layout (`block_sparse_moe` experts w1 / w3 / w2; in memory `mlp.router` and
stacked experts) with LayerNorms that have biases, and SparseMixer top-2 routing: each of the two experts weighted by a
softmax over only the logits within a relative 2·`router_jitter_noise` of it (`routers.SparseMixerRouter`).

Evaluation only: SparseMixer samples experts while training (and `input_jitter_noise` jitters the input), which the
router refuses. Biases on the attention projections and the LM head, and longrope with its mscales, are refused."""

from ..errors import UnsupportedModelError
from .base import register
from .mixtral import Mixtral


@register
class PhiMoe(Mixtral):
    model_types = ("phimoe",)
    hf_stacked_router = "router.weight"

    def layer_norm_with_bias(self) -> bool:
        return True

    def sparse_mixer_jitter_eps(self) -> float:
        return float(self.hf.router_jitter_noise)

    def transformer_config(self) -> dict:
        hf = self.hf
        if getattr(hf, "attention_bias", False):
            raise UnsupportedModelError(
                "attention_bias=True: PhiMoE's q/k/v/o biases without biases on its experts are not supported "
                "(megatron-core puts a bias on o_proj and the MLP together or on neither)."
            )
        if getattr(hf, "lm_head_bias", False):
            raise UnsupportedModelError("lm_head_bias=True: megatron-core's output layer has no bias.")
        rope_type = (getattr(hf, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type != "default":
            raise UnsupportedModelError(
                f"rope_type={rope_type!r}: PhiMoE scales its rotary by short_mscale / long_mscale, which is not "
                "implemented; only the default rotary is supported."
            )
        if self.experts_per_token() != 2:
            raise UnsupportedModelError(
                f"num_experts_per_tok={self.experts_per_token()}: SparseMixer always routes to 2 experts (transformers "
                "ignores the setting), so only 2 is supported."
            )
        return super().transformer_config()
