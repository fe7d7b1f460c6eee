"""GPT-OSS: attention with biases and a learned sink per head, sliding-window attention on alternate layers,
YaRN rotary; every layer an MoE whose router has a bias and whose experts (with biases) use a clamped
SwiGLU: (clamp(up, ±limit) + 1) · g·sigmoid(1.702·g), g = clamp(gate, max=limit).

megatron-core 0.16 expresses each piece: `softmax_type="learnable"` (the sinks), `quick_gelu` with
`glu_linear_offset=1` and `activation_func_clamp_value` (the SwiGLU), `add_bias_linear` (o_proj, router,
expert biases; an expert's down bias is scaled by its routing weight as in transformers), and
`window_size` with a per-layer `window_attn_skip_freq` list. Experts are stacked on disk
([E, H, 2·I] with gate/up interleaved, down [E, I, H]); MXFP4-quantized checkpoints are refused.
"""

from ..conversion.rules import Column, ExpertStack, InterleavedGateUp, Replicated, Rule, TransposedRow
from ..errors import UnsupportedModelError
from .base import HF_LAYER, LAYER, MoEDecoder, register


@register
class GptOss(MoEDecoder):
    model_types = ("gpt_oss",)

    def qkv_bias(self) -> bool:
        return True

    def linear_bias(self) -> bool:
        return True  # o_proj, the router and the experts all have biases

    def num_experts(self) -> int:
        return self.hf.num_local_experts

    def moe_intermediate_size(self) -> int:
        return self.hf.intermediate_size

    def normalize_top_k(self) -> bool:
        return True  # softmax over the top-k logits

    def rms_norm_weight_in_float32(self) -> bool:
        return True

    def transformer_config(self) -> dict:
        from megatron.core.activations import quick_gelu

        hf = self.hf
        quantization = getattr(hf, "quantization_config", None)
        if quantization:
            raise UnsupportedModelError(
                f"quantized GPT-OSS checkpoint ({quantization}): dequantize it first, e.g. load it with "
                "transformers' Mxfp4Config(dequantize=True) and save_pretrained the bf16 model."
            )
        if abs(getattr(hf, "swiglu_alpha", 1.702) - 1.702) > 1e-6:
            raise UnsupportedModelError(f"swiglu_alpha={hf.swiglu_alpha}: megatron's quick_gelu has 1.702 built in.")
        config = super().transformer_config()
        config.update(
            activation_func=quick_gelu,
            glu_linear_offset=1.0,
            activation_func_clamp_value=hf.swiglu_limit,
            softmax_type="learnable",
            **self.layer_windows([kind == "sliding_attention" for kind in hf.layer_types]),
        )
        return config

    def attention_rules(self) -> list[Rule]:
        sinks = Column(LAYER + "self_attention.core_attention.softmax_offset", HF_LAYER + "self_attn.sinks")
        return super().attention_rules() + [sinks]

    def mlp_rules(self) -> list[Rule]:
        mlp, hf_mlp = LAYER + "mlp.", HF_LAYER + "mlp."
        expert, hf_experts = mlp + "experts.local_experts.{e}.", hf_mlp + "experts."
        return [
            Replicated(mlp + "router.weight", hf_mlp + "router.weight"),
            Replicated(mlp + "router.bias", hf_mlp + "router.bias"),
            ExpertStack(InterleavedGateUp(expert + "linear_fc1.weight", hf_experts + "gate_up_proj", transposed=True)),
            ExpertStack(InterleavedGateUp(expert + "linear_fc1.bias", hf_experts + "gate_up_proj_bias")),
            ExpertStack(TransposedRow(expert + "linear_fc2.weight", hf_experts + "down_proj")),
            ExpertStack(Replicated(expert + "linear_fc2.bias", hf_experts + "down_proj_bias")),
        ]
