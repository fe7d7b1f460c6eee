"""MiniMax-M2: GQA attention with RMSNorms over the whole q and k projections (all heads at once, as OLMoE), rotate-half
rotary on the first `rotary_dim` of each head; every layer a mixture of experts without shared experts: sigmoid scores,
the top-k chosen by score plus a fixed correction bias (`e_score_correction_bias`, steering only the choice), their
scores renormalised to sum to one. Experts as Mixtral names them (`block_sparse_moe.experts.{e}.w1/w3/w2`) on disk;
transformers' in-memory stacked layout (`mlp.`) is read too."""

from .base import MoEDecoder, register


@register
class MiniMaxM2(MoEDecoder):
    model_types = ("minimax_m2",)
    hf_moe = "block_sparse_moe."
    hf_expert_gate_up_down = ("w1", "w3", "w2")
    hf_expert_bias = "e_score_correction_bias"

    def num_experts(self) -> int:
        return self.hf.num_local_experts

    def moe_intermediate_size(self) -> int:
        return self.hf.intermediate_size

    def qk_layernorm(self) -> bool:
        return True

    def qk_norm_over_heads(self) -> bool:
        return True

    def router_precision(self) -> str:
        return "float32_scores"  # logits in the weight's dtype, their sigmoid in float32

    def router_config(self) -> dict:
        # megatron's sigmoid routing: choice by score + expert_bias, the chosen scores divided by their sum
        return dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
