"""Mistral: Llama weights; attention may be limited to a sliding window."""

from typing import Optional

from .base import DecoderArchitecture, register


@register
class Mistral(DecoderArchitecture):
    model_types = ("mistral",)

    def sliding_window(self) -> Optional[int]:
        return getattr(self.hf, "sliding_window", None)
