"""SmolLM3: Llama with rotary skipped on some layers (`no_rope_layers[i] == 0`, every fourth layer by default; megatron's
`no_rope_freq`) and, with `use_sliding_window`, a window on the layers transformers marks "sliding_attention"."""

from .base import DecoderArchitecture, register


@register
class SmolLM3(DecoderArchitecture):
    model_types = ("smollm3",)

    def transformer_config(self) -> dict:
        hf = self.hf
        config = super().transformer_config()
        skipped = [int(not uses_rope) for uses_rope in hf.no_rope_layers]
        if any(skipped):
            config["no_rope_freq"] = skipped
        if getattr(hf, "use_sliding_window", False) and hf.sliding_window is not None:
            config.update(self.layer_windows([kind == "sliding_attention" for kind in hf.layer_types]))
        return config
