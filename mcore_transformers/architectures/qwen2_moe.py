"""Qwen2-MoE / Qwen1.5-MoE: Qwen2 attention (q/k/v bias); routed experts plus one shared expert whose
output is scaled by a sigmoid gate (megatron's shared_expert_gate)."""

from typing import Optional

from .base import MoEDecoder, register
from .qwen2 import Qwen2


@register
class Qwen2Moe(MoEDecoder, Qwen2):
    model_types = ("qwen2_moe",)
    hf_shared_expert = "shared_expert."
    hf_shared_expert_gate = "shared_expert_gate.weight"

    def softmax_weights_dtype(self) -> str:
        return "model"  # float32 softmax and renormalisation, weights cast to the logits' dtype

    def shared_expert_size(self) -> Optional[int]:
        return self.hf.shared_expert_intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        hf = self.hf
        return layer not in (hf.mlp_only_layers or []) and (layer + 1) % hf.decoder_sparse_step == 0
