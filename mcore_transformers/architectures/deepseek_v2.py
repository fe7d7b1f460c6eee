"""DeepSeek-V2 / V2-Lite / V2.5 / Coder-V2: DeepSeek-V3's multi-latent attention (q through `q_proj` when
q_lora_rank is None, as in V2-Lite), shared experts and dense first layers, with softmax routing:

- softmax over all experts; the top-k scores, never renormalised, times `routed_scaling_factor`;
- `topk_method` "greedy" (any expert) or "group_limited_greedy": only experts of the `topk_group` groups (of `n_group`)
  whose best score is highest (`expert_groups_ranked_by_best_score`); no score correction bias.

transformers ignores `norm_topk_prob` and `moe_layer_freq` for this family, while DeepSeek's own code honours them;
checkpoints that set them away from the published values (False, 1) are refused rather than guessed.
"""

from ..errors import UnsupportedModelError
from .base import register
from .deepseek_v3 import DeepseekV3

TOPK_METHODS = ("greedy", "group_limited_greedy")


@register
class DeepseekV2(DeepseekV3):
    model_types = ("deepseek_v2",)
    hf_expert_bias = None

    def normalize_top_k(self) -> bool:
        return False  # transformers never renormalises (norm_topk_prob=True is refused in router_config)

    def expert_groups_ranked_by_best_score(self) -> bool:
        return True

    def router_config(self) -> dict:
        hf = self.hf
        scoring, method = getattr(hf, "scoring_func", "softmax"), hf.topk_method
        if scoring != "softmax":
            raise UnsupportedModelError(f"DeepSeek-V2 scoring_func={scoring!r}: transformers routes by softmax only.")
        if method not in TOPK_METHODS:
            raise UnsupportedModelError(
                f"DeepSeek-V2 topk_method={method!r}: supported are {', '.join(map(repr, TOPK_METHODS))}."
            )
        if getattr(hf, "norm_topk_prob", False):
            raise UnsupportedModelError(
                "DeepSeek-V2 norm_topk_prob=True: transformers ignores it (top-k weights never renormalised) while "
                "DeepSeek's reference code renormalises; set it to false to load the model as transformers runs it."
            )
        if getattr(hf, "moe_layer_freq", 1) != 1:
            raise UnsupportedModelError(
                f"DeepSeek-V2 moe_layer_freq={hf.moe_layer_freq}: transformers ignores it (every layer from "
                "first_k_dense_replace on is an MoE layer) while DeepSeek's reference code honours it."
            )
        config = dict(
            moe_router_score_function="softmax",
            moe_router_pre_softmax=True,  # softmax over all experts, then top-k
            moe_router_topk_scaling_factor=hf.routed_scaling_factor,
        )
        groups, chosen = hf.n_group or 1, hf.topk_group or 1
        if method == "group_limited_greedy" and 1 < groups and chosen < groups:
            config.update(moe_router_num_groups=groups, moe_router_group_topk=chosen)
        return config
