"""IBM Granite 3 (granite) and its mixture of experts (granitemoe): Llama with four scalars transformers honours.

- `embedding_multiplier`: the embedding output times it (transformers multiplies by the Python float: exact here for
  any dtype when the factor is a power of two or small integer, like Granite 3's 12; a factor that bf16 cannot hold
  rounds as Gemma's does, to the model dtype first).
- `residual_multiplier`: each sublayer's output times it before its residual add.
- `attention_multiplier`: the attention score scale (instead of head_dim^-0.5).
- `logits_scaling`: the LM head's logits divided by it.
granitemoe: every layer a mixture of `num_local_experts` experts of `intermediate_size`, routed by a softmax over the
top-k router logits (Mixtral's routing), no shared expert. Its checkpoints stack the experts: `input_linear.weight`
[E, 2·I, H] (gate rows, then up) and `output_linear.weight` [E, H, I], router `router.layer.weight`; transformers'
in-memory names (`experts.gate_up_proj`, `experts.down_proj`, `router.weight`) are read too.
"""

from typing import Optional

from ..conversion.rules import ExpertStack, GateUpRows, OneOf, Replicated, Row, Rule
from ..errors import UnsupportedModelError
from .base import HF_LAYER, LAYER, DecoderArchitecture, MoEDecoder, register


@register
class Granite(DecoderArchitecture):
    model_types = ("granite",)

    def embedding_multiplier(self) -> Optional[float]:
        return None if self.hf.embedding_multiplier == 1.0 else float(self.hf.embedding_multiplier)

    def residual_multiplier(self) -> Optional[float]:
        return None if self.hf.residual_multiplier == 1.0 else float(self.hf.residual_multiplier)

    def logits_divisor(self) -> Optional[float]:
        return None if self.hf.logits_scaling == 1.0 else float(self.hf.logits_scaling)

    def softmax_scale(self) -> Optional[float]:
        return self.hf.attention_multiplier * self.rope_attention_factor() ** 2


@register
class GraniteMoe(MoEDecoder, Granite):
    model_types = ("granitemoe",)
    hf_moe = "block_sparse_moe."

    def num_experts(self) -> int:
        return self.hf.num_local_experts

    def moe_intermediate_size(self) -> int:
        return self.hf.intermediate_size

    def normalize_top_k(self) -> bool:
        return True  # a softmax over the top-k logits

    def linear_bias(self) -> bool:
        if getattr(self.hf, "attention_bias", False):
            raise UnsupportedModelError(
                "granitemoe with attention_bias=True: its o_proj has a bias and its experts none; megatron-core puts a "
                "bias on o_proj and the MLP together or on neither."
            )
        return False

    def qkv_bias(self) -> bool:
        return False

    def mlp_rules(self) -> list[Rule]:
        moe, mlp = HF_LAYER + self.hf_moe, LAYER + "mlp."
        expert = mlp + "experts.local_experts.{e}."
        stacked = lambda rule, on_disk, in_memory: OneOf(  # noqa: E731
            ExpertStack(rule(expert + on_disk[0], moe + on_disk[1])),
            ExpertStack(rule(expert + in_memory[0], moe + in_memory[1])),
        )
        return [
            OneOf(Replicated(mlp + "router.weight", moe + "router.layer.weight"),
                  Replicated(mlp + "router.weight", moe + "router.weight")),
            stacked(GateUpRows, ("linear_fc1.weight", "input_linear.weight"), ("linear_fc1.weight", "experts.gate_up_proj")),
            stacked(Row, ("linear_fc2.weight", "output_linear.weight"), ("linear_fc2.weight", "experts.down_proj")),
        ]
