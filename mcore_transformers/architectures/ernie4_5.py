"""ERNIE 4.5 (dense): Llama with GLM-style interleaved rotary (adjacent elements paired) and one `use_bias` switch
for every linear of a layer."""

from .base import DecoderArchitecture, register


@register
class Ernie4_5(DecoderArchitecture):
    model_types = ("ernie4_5",)

    def rotary_interleaved(self) -> bool:
        return True

    def qkv_bias(self) -> bool:
        return bool(getattr(self.hf, "use_bias", False))

    def linear_bias(self) -> bool:
        return bool(getattr(self.hf, "use_bias", False))
