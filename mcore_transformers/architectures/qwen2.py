"""Qwen2 / Qwen2.5: Llama layout plus a bias on q, k and v (not on o_proj)."""

from typing import Optional

from ..errors import UnsupportedModelError
from .base import DecoderArchitecture, register


@register
class Qwen2(DecoderArchitecture):
    model_types = ("qwen2",)

    def qkv_bias(self) -> bool:
        return True

    def linear_bias(self) -> bool:
        return False

    def sliding_window(self) -> Optional[int]:
        if not getattr(self.hf, "use_sliding_window", False):
            return None
        if getattr(self.hf, "max_window_layers", 0) < self.hf.num_hidden_layers:
            raise UnsupportedModelError("Qwen2 with sliding window on only some layers is not supported.")
        return self.hf.sliding_window
