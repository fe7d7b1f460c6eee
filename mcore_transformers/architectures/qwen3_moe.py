"""Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm); softmax top-k routing, renormalised when norm_topk_prob.

Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step` grid, keep a dense MLP.
"""

from .base import MoEDecoder, register
from .qwen3 import Qwen3


@register
class Qwen3Moe(MoEDecoder, Qwen3):
    model_types = ("qwen3_moe",)

    def softmax_weights_dtype(self) -> str:
        return "model"  # float32 softmax and renormalisation, weights cast to the logits' dtype

    def is_moe_layer(self, layer: int) -> bool:
        hf = self.hf
        return layer not in (hf.mlp_only_layers or []) and (layer + 1) % hf.decoder_sparse_step == 0
