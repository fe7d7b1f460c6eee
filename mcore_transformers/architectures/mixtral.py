"""Mixtral: Mistral attention; every layer's MLP is `block_sparse_moe` with experts w1 (gate), w3 (up),
w2 (down), routed by a softmax over the top-k logits (weights always sum to one)."""

from .base import MoEDecoder, register
from .mistral import Mistral


@register
class Mixtral(MoEDecoder, Mistral):
    model_types = ("mixtral",)
    hf_moe = "block_sparse_moe."
    hf_expert_gate_up_down = ("w1", "w3", "w2")

    def num_experts(self) -> int:
        return self.hf.num_local_experts

    def moe_intermediate_size(self) -> int:
        return self.hf.intermediate_size

    def softmax_weights_dtype(self) -> str:
        return "float32"  # float32 softmax and renormalisation; the weights stay float32

    def normalize_top_k(self) -> bool:
        return True
