"""ERNIE 4.5 MoE (ERNIE-4.5-21B-A3B, 300B-A47B): ERNIE 4.5's attention (interleaved rotary) and a mixture of experts.

- Routing: a float32 softmax over all `moe_num_experts`; the `moe_k` experts chosen by probability plus a fixed
  score-correction bias (`mlp.moe_statics.e_score_correction_bias`, `[1, experts]` on disk; it steers only the choice);
  their probabilities renormalised by their sum clamped below at `moe_norm_min`.
- `moe_num_shared_experts` shared experts (one MLP of `moe_num_shared_experts · moe_intermediate_size`) on every MoE
  layer, no gate. MoE layers: every `moe_layer_interval`-th layer (1-based) from `moe_layer_start_index` to
  `moe_layer_end_index` (-1: the last); the others are dense MLPs of `intermediate_size`.
- Experts one tensor per expert and projection on the hub (transformers' in-memory stacked layout is read too).
"""

from typing import Optional

from ..conversion.rules import OneOf, Rule, UnitLeadingDim
from ..errors import UnsupportedModelError
from .base import HF_LAYER, LAYER, MoEDecoder, register
from .ernie4_5 import Ernie4_5


@register
class Ernie4_5Moe(MoEDecoder, Ernie4_5):
    model_types = ("ernie4_5_moe",)

    hf_shared_expert = "shared_experts."

    def num_experts(self) -> int:
        return self.hf.moe_num_experts

    def experts_per_token(self) -> int:
        return self.hf.moe_k

    def shared_expert_size(self) -> Optional[int]:
        shared = self.hf.moe_num_shared_experts
        return self.hf.moe_intermediate_size * shared if shared else None

    def is_moe_layer(self, layer: int) -> bool:
        hf = self.hf
        last = hf.num_hidden_layers - 1 if hf.moe_layer_end_index == -1 else hf.moe_layer_end_index
        return (layer + 1) % hf.moe_layer_interval == 0 and hf.moe_layer_start_index <= layer <= last

    def softmax_routing_selection_bias_floor(self) -> Optional[float]:
        return float(self.hf.moe_norm_min)

    def router_precision(self) -> str:
        return "float32"  # gate.weight and the correction bias kept in float32, softmax in float32

    def router_config(self) -> dict:
        # the routing itself is SelectionBiasedSoftmaxRouter's; megatron's config only has to agree with it
        return dict(moe_router_score_function="softmax", moe_router_pre_softmax=True)

    def linear_bias(self) -> bool:
        if getattr(self.hf, "use_bias", False):
            raise UnsupportedModelError(
                "ERNIE 4.5 MoE with use_bias=True: its routed experts have no biases while its attention, dense and "
                "shared-expert MLPs have; megatron-core puts biases on all of its linears or on none."
            )
        return False

    def mlp_rules(self) -> list[Rule]:
        bias = LAYER + "mlp.router.expert_bias"
        on_disk, in_memory = (HF_LAYER + f"mlp.{where}e_score_correction_bias" for where in ("moe_statics.", "gate.moe_statics."))
        return super().mlp_rules() + [OneOf(UnitLeadingDim(bias, on_disk), UnitLeadingDim(bias, in_memory))]
