"""Qwen3: RMSNorm on each query and key head before rotary; head_dim set independently of hidden/heads."""

from .base import DecoderArchitecture, register
from .qwen2 import Qwen2


@register
class Qwen3(Qwen2):
    model_types = ("qwen3",)

    # Qwen3 puts `attention_bias` on q, k, v and o alike (Qwen2 hard-wires q/k/v only).
    qkv_bias = DecoderArchitecture.qkv_bias
    linear_bias = DecoderArchitecture.linear_bias

    def qk_layernorm(self) -> bool:
        return True
