"""Routers megatron-core's TopKRouter has no setting for, as TopKRouter subclasses (no patches).

An architecture asks for one through a switch (`expert_groups_ranked_by_best_score`,
`softmax_routing_selection_bias_floor`, `sparse_mixer_jitter_eps`); `router_for` picks the class and the builder puts
it in the MoE layers' spec. Each reproduces transformers' routing arithmetic and runs without megatron's auxiliary
losses, z-loss or token dropping (refused otherwise): the families that use them have none. `router_precision` adds
where transformers rounds in a bf16 model (a float32 router weight, or float32 scores of model-dtype logits) as a mixin
on the chosen router.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter

from ..errors import UnsupportedModelError


def router_for(arch, config) -> Optional[type]:
    """The router class `arch`'s switches ask for (None: megatron's own TopKRouter)."""
    if not config.num_moe_experts:
        return None
    chosen = []
    if config.moe_router_group_topk and arch.expert_groups_ranked_by_best_score():
        chosen.append(BestScoreGroupRouter)
    floor = arch.softmax_routing_selection_bias_floor()
    if floor is not None:
        chosen.append(softmax_router_with_selection_bias(floor))
    weights_dtype = arch.softmax_weights_dtype()
    if weights_dtype is not None:
        chosen.append(probability_top_k_router(arch.normalize_top_k(), weights_dtype == "float32"))
    jitter_eps = arch.sparse_mixer_jitter_eps()
    if jitter_eps is not None:
        chosen.append(sparse_mixer_router(jitter_eps))
    if len(chosen) > 1:
        raise UnsupportedModelError(f"routing switches that exclude each other: {[c.__name__ for c in chosen]}.")
    routing = chosen[0] if chosen else None
    precision = PRECISIONS[arch.router_precision()]
    if precision is None:
        return routing
    base = routing or TopKRouter
    return type(precision.__name__ + base.__name__, (precision, base), {})


class Float32WeightRouter(TopKRouter):
    """A router whose logits are float32 products of a float32 weight in a bfloat16 / float16 model, as transformers
    keeps `gate.weight` (`_keep_in_fp32_modules_strict`). The loader keeps the weight unrounded (float32, or the model
    dtype where the checkpoint holds it so: the same values), and a save writes it back as it was read."""

    def reset_parameters(self):
        super().reset_parameters()
        self.weight.data = self.weight.data.float()

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        # the input cast first, as transformers does (Transformer Engine's GEMM takes operands of one dtype)
        return router_gating_linear(input.float(), self.weight, self.bias, torch.float32)


class ModelDtypeLogitsRouter(TopKRouter):
    """A router whose logits are rounded to the model dtype and then scored in float32, with its score-correction bias
    in the model dtype (MiniMax-M2 in transformers: `F.linear` in the weight's dtype, `sigmoid(logits.float())`, the bias
    buffer cast with the model). megatron would round the scores back to the logits' dtype."""

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        if self.expert_bias is not None:
            self.expert_bias = self.expert_bias.to(config.params_dtype)  # loaded, and saved, in the model dtype

    def _maintain_float32_expert_bias(self):
        pass  # the bias keeps the model dtype (megatron would cast it back to float32)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        return router_gating_linear(input, self.weight, self.bias, self.weight.dtype).float()


# router_precision() -> the mixin that gives a router that arithmetic (None: megatron's own)
PRECISIONS: dict[str, Optional[type]] = {
    "model": None, "float32": Float32WeightRouter, "float32_scores": ModelDtypeLogitsRouter,
}


class BestScoreGroupRouter(TopKRouter):
    """megatron's top-k router with group-limited routing that ranks each group of experts by its best score.

    DeepSeek-V2's "group_limited_greedy" (transformers' DeepseekV2TopkRouter): softmax over all experts, keep the
    `moe_router_group_topk` groups whose best score is highest, take the top-k scores among their experts, scaled by
    `moe_router_topk_scaling_factor`. megatron's own routing ranks a group by the sum of its top (top_k // group_topk)
    scores: the same groups only when that quotient is 1. megatron's auxiliary losses, z-loss and token dropping are
    not applied here; the architectures that choose this router run without them (refused below otherwise).
    """

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        extras = self.is_aux_loss_enabled() or config.moe_z_loss_coeff or config.moe_expert_capacity_factor is not None
        if config.moe_router_score_function != "softmax" or not config.moe_router_pre_softmax or extras:
            raise ValueError(
                "BestScoreGroupRouter routes by a softmax over all experts, without auxiliary losses, z-loss or "
                "token dropping."
            )

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        config = self.config
        logits = logits.view(-1, config.num_moe_experts)
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
        groups = config.moe_router_num_groups
        best = scores.view(scores.shape[0], groups, -1).amax(dim=-1)  # [tokens, groups]
        kept = best.topk(config.moe_router_group_topk, dim=-1).indices
        in_kept_group = torch.zeros_like(best, dtype=torch.bool).scatter(1, kept, True)
        in_kept_group = in_kept_group.repeat_interleave(config.num_moe_experts // groups, dim=1)
        probs, chosen = scores.masked_fill(~in_kept_group, 0.0).topk(self.topk, dim=-1)
        if config.moe_router_topk_scaling_factor:
            probs = probs * config.moe_router_topk_scaling_factor
        routing_probs = torch.zeros_like(logits).scatter(1, chosen, probs)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, True)
        return routing_probs, routing_map


def softmax_router_with_selection_bias(norm_floor: float) -> type:
    """`SelectionBiasedSoftmaxRouter` whose renormalisation divides by the chosen probabilities' sum clamped below at
    `norm_floor` (ERNIE-4.5's `moe_norm_min`)."""

    class FlooredSelectionBiasedSoftmaxRouter(SelectionBiasedSoftmaxRouter):
        floor = norm_floor

    return FlooredSelectionBiasedSoftmaxRouter


class SelectionBiasedSoftmaxRouter(TopKRouter):
    """megatron's top-k router with softmax scores whose choice of experts adds a score-correction bias.

    ERNIE-4.5's routing (transformers' Ernie4_5_MoeTopKRouter): a float32 softmax over all experts; the top-k experts
    by probability + `expert_bias` (which steers only the choice); their probabilities divided by their sum (clamped
    below at `floor`). megatron takes a selection bias with sigmoid scores only (its config refuses one with softmax),
    so this router keeps the bias itself, fixed (transformers never updates it). Like
    `BestScoreGroupRouter`, it runs without megatron's auxiliary losses, z-loss or token dropping.
    """

    floor: float = 0.0

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        _check_plain_softmax(
            self, "SelectionBiasedSoftmaxRouter routes by a softmax over all experts with its own fixed bias"
        )
        # A frozen parameter, as in transformers (counted by num_parameters, never trained), under megatron's name.
        self.expert_bias = torch.nn.Parameter(torch.zeros(config.num_moe_experts, dtype=torch.float32), requires_grad=False)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        logits = logits.view(-1, self.config.num_moe_experts)
        scores = torch.softmax(logits.float(), dim=-1)
        chosen = (scores + self.expert_bias).topk(self.topk, dim=-1).indices
        probs = scores.gather(1, chosen)
        # weights in the model dtype as transformers casts them (the logits may be float32: router_precision)
        probs = (probs / probs.sum(dim=-1, keepdim=True).clamp(min=self.floor)).to(self.config.params_dtype)
        routing_probs = torch.zeros_like(logits, dtype=probs.dtype).scatter(1, chosen, probs)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, True)
        return routing_probs, routing_map


def _check_plain_softmax(router: TopKRouter, what: str) -> None:
    """These routers compute transformers' softmax routing themselves: megatron's extras would be skipped silently."""
    config = router.config
    extras = router.is_aux_loss_enabled() or config.moe_z_loss_coeff or config.moe_expert_capacity_factor is not None
    if config.moe_router_score_function != "softmax" or config.moe_router_enable_expert_bias or extras:
        raise ValueError(f"{what}, without megatron's score correction, auxiliary losses, z-loss or token dropping.")


def probability_top_k_router(renormalised: bool, float32_weights: bool) -> type:
    """`ProbabilityTopKRouter` that renormalises the chosen probabilities or not, and keeps its weights in float32 or
    casts them to the logits' dtype."""

    class ConfiguredProbabilityTopKRouter(ProbabilityTopKRouter):
        renormalise = renormalised
        weights_in_float32 = float32_weights

    return ConfiguredProbabilityTopKRouter


class ProbabilityTopKRouter(TopKRouter):
    """Softmax routing in transformers' order (Qwen2/3-MoE, OLMoE, Mixtral): a float32 softmax over all experts, the
    top-k experts by probability, their probabilities divided by their sum when `renormalise`, then cast to the logits'
    dtype unless `weights_in_float32`. megatron either takes the top-k logits and a softmax over them (the same experts,
    other roundings) or chooses among probabilities already rounded to the logits' dtype (in bf16, ties transformers
    does not have). Like `BestScoreGroupRouter`, it runs without megatron's auxiliary losses, z-loss or token dropping.
    """

    renormalise: bool = False
    weights_in_float32: bool = False

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        _check_plain_softmax(
            self, "ProbabilityTopKRouter routes by a softmax over all experts, without a score correction"
        )

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        logits = logits.view(-1, self.config.num_moe_experts)
        probs, chosen = torch.softmax(logits, dim=-1, dtype=torch.float32).topk(self.topk, dim=-1)
        if self.renormalise:
            probs = probs / probs.sum(dim=-1, keepdim=True)
        if not self.weights_in_float32:
            probs = probs.to(logits.dtype)
        routing_probs = torch.zeros_like(logits, dtype=probs.dtype).scatter(1, chosen, probs)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, True)
        return routing_probs, routing_map


def sparse_mixer_router(jitter_eps: float) -> type:
    """`SparseMixerRouter` whose masks keep the logits within a relative `2 · jitter_eps` of the best (PhiMoE's
    `router_jitter_noise`)."""

    class ThresholdedSparseMixerRouter(SparseMixerRouter):
        threshold = 2 * jitter_eps

    return ThresholdedSparseMixerRouter


class SparseMixerRouter(TopKRouter):
    """PhiMoE's SparseMixer top-2 routing (transformers' `sparsemixer`) in evaluation.

    The first expert is the best logit, weighted by its softmax over only the logits within a relative `threshold` of
    it (`(best - logit) / max(|logit|, best) <= threshold`); the second is the best logit once the first is masked,
    weighted by its softmax over the remaining logits within the threshold of it. Training samples the experts (Gumbel
    noise), jitters the input and estimates the routing gradient with Heun's method: not implemented, refused.
    Like `BestScoreGroupRouter`, it runs without megatron's auxiliary losses, z-loss or token dropping.
    """

    threshold: float = 0.0

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        extras = self.is_aux_loss_enabled() or config.moe_z_loss_coeff or config.moe_expert_capacity_factor is not None
        if self.topk != 2 or config.moe_router_enable_expert_bias or extras:
            raise ValueError(
                "SparseMixerRouter routes each token to 2 experts, without a score correction, auxiliary losses, "
                "z-loss or token dropping."
            )

    def _masked_softmax_weight(self, scores, logits, best, chosen):
        """The weight of `chosen` (the best of `scores`): its softmax over the `scores` within the threshold of `best`."""
        factor = logits.abs().clamp(min=best)
        outside = ((best - logits) / factor) > self.threshold
        return torch.softmax(scores.masked_fill(outside, float("-inf")), dim=-1).gather(-1, chosen)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if self.training:
            raise NotImplementedError(
                "PhiMoE's SparseMixer router samples experts while training (Gumbel noise, input_jitter_noise, a "
                "Heun's-method gradient estimator); only evaluation is implemented. Call model.eval() (forward, "
                "generate and export are exact); training this model is not supported."
            )
        logits = logits.view(-1, self.config.num_moe_experts)
        best, first = logits.max(dim=-1, keepdim=True)
        first_weight = self._masked_softmax_weight(logits, logits, best, first)
        without_first = torch.scatter(logits, -1, first, float("-inf"))
        second_best, second = without_first.max(dim=-1, keepdim=True)
        second_weight = self._masked_softmax_weight(without_first, logits, second_best, second)
        chosen = torch.cat((first, second), dim=-1)
        probs = torch.cat((first_weight, second_weight), dim=-1)
        routing_probs = torch.zeros_like(logits).scatter(1, chosen, probs)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, True)
        return routing_probs, routing_map
