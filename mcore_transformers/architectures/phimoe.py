"""PhiMoE (Phi-3.5-MoE): Mixtral's layout (`block_sparse_moe` experts w1 / w3 / w2; in memory `mlp.router` and
stacked experts) with LayerNorms that have biases, and SparseMixer top-2 routing: each of the two experts weighted by a
softmax over only the logits within a relative 2·`router_jitter_noise` of it (`routers.SparseMixerRouter`).

`attention_bias`: biases on q/k/v and o_proj while the experts have none (o_proj's is megatron's linear_proj's own,
`attention_output_bias`); `lm_head_bias`: a bias on the LM head. A rotary other than the default (the published
longrope) multiplies cos and sin by `short_mscale`, or `long_mscale` in a forward whose positions pass
original_max_position_embeddings, and transformers rotates by the short factors at every length (its rotary re-runs
the rope init without the sequence length). Both mscales equal (the published config) is one softmax scale; different
ones are refused.

Evaluation only: SparseMixer samples experts while training (and `input_jitter_noise` jitters the input), which the
router refuses."""

from typing import Optional

import torch

from ..errors import UnsupportedModelError
from .base import register
from .mixtral import Mixtral


@register
class PhiMoe(Mixtral):
    model_types = ("phimoe",)
    hf_stacked_router = "router.weight"

    def layer_norm_with_bias(self) -> bool:
        return True

    def linear_bias(self) -> bool:
        return False  # the experts never have biases (q/k/v's: `qkv_bias`, o_proj's: `attention_output_bias`)

    def attention_output_bias(self) -> bool:
        return bool(getattr(self.hf, "attention_bias", False))

    def lm_head_bias(self) -> bool:
        return bool(getattr(self.hf, "lm_head_bias", False))

    def sparse_mixer_jitter_eps(self) -> float:
        return float(self.hf.router_jitter_noise)

    def softmax_weights_dtype(self) -> None:
        return None  # SparseMixer's routing, not Mixtral's

    def long_rope(self) -> Optional[tuple[int, torch.Tensor]]:
        return None  # transformers' PhiMoE rotary takes the short factors whatever the length

    def rope_attention_factor(self) -> float:
        params = self.rope_parameters()
        if params.get("rope_type", "default") == "default":
            return super().rope_attention_factor()
        short, long = float(params["short_mscale"]), float(params["long_mscale"])
        if short != long:
            raise UnsupportedModelError(
                f"short_mscale={short} with long_mscale={long}: PhiMoE's rotary factor then changes with the length of "
                "each forward, which is not implemented (one softmax scale holds it when both are equal)."
            )
        return short

    def transformer_config(self) -> dict:
        if self.experts_per_token() != 2:
            raise UnsupportedModelError(
                f"num_experts_per_tok={self.experts_per_token()}: SparseMixer always routes to 2 experts (transformers "
                "ignores the setting), so only 2 is supported."
            )
        return super().transformer_config()
