"""Per-token statistics of the next-token distribution, from this rank's vocabulary shard of the logits: what TRL's
fused LM head returns (`model(..., labels=labels, fused_lm_head=True)`), so TRL's trainers (DPO, GRPO, KTO, RLOO)
read their log-probabilities from a megatron-core model at any tp / pp without the full logits being gathered.

Each statistic is a sum over the vocabulary, so a shard computes its part and one all-reduce over the
tensor-parallel group completes it (megatron's `reduce_from_tensor_model_parallel_region`: the backward is the
identity, as every rank back-propagates the same loss). The padded vocabulary rows tensor parallelism adds are left
out, so the numbers are those over the `vocab_size` real tokens. The formulas are TRL's (`trl.kernels.chunked_logprob`,
checked on TRL 1.16): log-probability and entropy carry gradients; `log_sum_sq_probs`, `mean_logits` and `is_top1`
do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from transformers.utils import ModelOutput

IGNORE_INDEX = -100


@dataclass
class FusedHeadOutput(ModelOutput):
    """The fields of TRL's `FusedCausalLMOutput`, each [b, s - 1] (or [b, s] with `shift_labels`), zero where the
    label is -100."""

    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """HF causal-LM targets: position t predicts labels[t + 1]; the last position predicts nothing."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


STATISTICS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _tensor_parallel_max(value: torch.Tensor) -> torch.Tensor:
    if ps.get_tensor_model_parallel_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    return value


def token_statistics(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> dict:
    """The statistics of `STATISTICS`, [b, s], from this rank's logits shard [s, b, V_pad / tp] and `targets` [b, s]
    (the label each position predicts; -100 = none, its statistics 0)."""
    z = logits.float().transpose(0, 1) / temperature  # [b, s, shard]
    shard = z.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * shard
    real = max(0, min(shard, vocab_size - start))
    column = torch.arange(shard, device=z.device)
    padding = column >= real
    mask = targets.ne(IGNORE_INDEX)
    local = targets - start
    in_shard = (local >= 0) & (local < real) & mask

    real_z = z.masked_fill(padding, float("-inf"))  # exp gives 0 there, with a zero gradient
    running_max = _tensor_parallel_max(real_z.detach().amax(-1))
    exp = torch.exp(real_z - running_max.unsqueeze(-1))
    sum_exp = reduce_from_tensor_model_parallel_region(exp.sum(-1))
    log_z = running_max + torch.log(sum_exp)
    picked = z.gather(-1, local.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = reduce_from_tensor_model_parallel_region(torch.where(in_shard, picked, torch.zeros_like(picked)))
    log_probs = target_logit - log_z
    entropy = log_z - reduce_from_tensor_model_parallel_region((exp * z.masked_fill(padding, 0.0)).sum(-1)) / sum_exp
    with torch.no_grad():
        log_sum_sq_probs = torch.log(reduce_from_tensor_model_parallel_region((exp * exp).sum(-1))) - 2 * torch.log(sum_exp)
        mean_logits = reduce_from_tensor_model_parallel_region(z.masked_fill(padding, 0.0).sum(-1)) / vocab_size
        # argmax takes the first maximum: a tie with an earlier token is not a top-1 prediction (TRL's rule)
        before = (column + start) < targets.unsqueeze(-1)
        max_before = _tensor_parallel_max(z.masked_fill(padding | ~before, float("-inf")).amax(-1))
        is_top1 = (target_logit >= running_max) & (target_logit > max_before)
    values = (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)
    return {name: value.masked_fill(~mask, 0) for name, value in zip(STATISTICS, values)}


def fused_head_output(statistics: dict, targets: torch.Tensor, num_items_in_batch=None) -> FusedHeadOutput:
    """TRL's output from the statistics: the loss is the mean negative log-probability over the labelled tokens (or
    their sum over `num_items_in_batch`)."""
    mask = targets.ne(IGNORE_INDEX)
    divisor = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedHeadOutput(loss=-statistics["log_probs"].sum() / divisor, label_mask=mask, **statistics)
