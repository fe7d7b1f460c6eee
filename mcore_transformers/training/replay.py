"""A trainer's own loss (TRL's DPO, GRPO, KTO, RLOO, ...) at any tp / pp: computed by the trainer's `compute_loss`
as written, its gradient replayed through megatron's pipeline schedule.

These losses read the model only through TRL's fused LM head: `model(..., labels=labels, fused_lm_head=True)` gives
per-token log-probabilities (and entropies), and everything after (reference log-ratios, sigmoid or clipped losses,
group advantages, metrics) is arithmetic on them. Under pipeline parallelism no single rank can run that code with
the model's autograd graph, so a step takes two passes:

1. record: `compute_loss` runs on every rank with a stand-in model (`Recorder`) that answers each fused-head call
   from a forward without gradients (the same statistics on every rank, model/token_statistics.py) and returns the
   log-probabilities and entropies as leaf tensors. Back-propagating the trainer's loss to those leaves gives
   dL/d(log p) and dL/d(entropy) per token;
2. replay: megatron's schedule runs forward and backward over the same inputs with the loss
   sum(dL/d(log p) · log p + dL/d(entropy) · entropy), whose gradient with respect to the weights is the trainer's
   (chain rule), on every layout, with micro-batches, accumulation and the grad finalisation of MCoreTrainer's own step.

The cost is one extra forward without gradients per step. Both passes must compute the same function, so dropout
must be off (TRL's trainers turn it off by default: `disable_dropout=True`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..model.token_statistics import IGNORE_INDEX, FusedHeadOutput, shifted_targets, token_statistics
from .errors import TrainingError

# What a fused-head call may carry besides the model inputs: ignored (no cache is kept while training)
_HARMLESS = frozenset({"use_cache", "return_dict", "num_items_in_batch"})


@dataclass
class RecordedCall:
    batch: dict  # the model inputs and labels of one fused-head call
    temperature: float
    log_probs: torch.Tensor  # the leaves handed to compute_loss: [b, s - 1]
    entropy: torch.Tensor


class Recorder(nn.Module):
    """The model as `compute_loss` sees it in the record pass: fused-head calls answered without gradients, their
    log-probabilities and entropies returned as leaves (see the module docstring)."""

    def __init__(self, mcore, model_inputs: Sequence[str]):
        super().__init__()
        self.mcore = mcore
        self.model_inputs = tuple(model_inputs)
        self.calls: list[RecordedCall] = []
        self.train(mcore.training)

    def forward(self, *, fused_lm_head: bool = False, labels: Optional[torch.Tensor] = None, **kwargs):
        if not fused_lm_head or labels is None:
            raise TrainingError(
                "This trainer's compute_loss calls the model without TRL's fused LM head "
                "(`model(..., labels=labels, fused_lm_head=True)`). MCoreTrainer replays a custom loss through "
                "megatron's schedule only from the per-token log-probabilities that head returns."
            )
        if kwargs.get("output_router_logits"):
            raise TrainingError(
                "The MoE load-balancing loss (output_router_logits / config.output_router_logits=True) with a trainer's "
                "own loss (TRL's DPO, GRPO, ...) is not supported by MCoreTrainer: it would receive no gradient. Set "
                "model.config.output_router_logits=False."
            )
        unknown = sorted(set(kwargs) - set(self.model_inputs) - _HARMLESS - {"output_router_logits"})
        if unknown:
            raise TrainingError(
                f"The fused-head call passes {unknown}, which MCoreTrainer cannot replay through megatron's schedule "
                f"(it takes {list(self.model_inputs)})."
            )
        batch = {key: kwargs[key] for key in self.model_inputs if kwargs.get(key) is not None}
        batch["labels"] = labels
        with torch.no_grad():
            output = self.mcore(**batch, fused_lm_head=True)
        log_probs = output.log_probs.detach().requires_grad_()
        entropy = output.entropy.detach().requires_grad_()
        self.calls.append(RecordedCall(batch, self.mcore.fused_head_temperature, log_probs, entropy))
        fields = dict(output.items(), log_probs=log_probs, entropy=entropy)
        fields["loss"] = -log_probs.sum() / output.label_mask.sum().clamp(min=1)
        return FusedHeadOutput(**fields)


def check_replayable(mcore) -> None:
    """Both passes must compute the same function: no dropout."""
    config = mcore.chunks[0].config
    rates = {name: getattr(config, name, 0.0) for name in ("hidden_dropout", "attention_dropout")}
    if mcore.training and any(rate for rate in rates.values()):
        raise TrainingError(
            f"Dropout is on ({rates}): MCoreTrainer computes a trainer's own loss in one pass and replays its gradient "
            "in a second, which must see the same dropout masks. Turn dropout off (TRL: disable_dropout=True, its "
            "default; or load the model with hidden_dropout=0.0, attention_dropout=0.0)."
        )


def replay(
    calls: list[RecordedCall], loss: torch.Tensor, step, chunks: Sequence[nn.Module], micro_batch_size: int,
    scale: float, finalize_grads: bool,
) -> None:
    """Pass 2: each recorded call through the schedule with the surrogate loss, gradients scaled by `scale`
    (1 / data-parallel size: megatron sums the replicas' gradients where transformers' DDP averages them)."""
    if not calls:
        raise TrainingError("compute_loss never called the model: there is no gradient to replay.")
    leaves = [leaf for call in calls for leaf in (call.log_probs, call.entropy)]
    grads = [None] * len(leaves)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if grad is None else grad * scale for leaf, grad in zip(leaves, grads)]
    step.aux = None
    for index, call in enumerate(calls):
        batch = dict(call.batch, log_probs_grad=grads[2 * index], entropy_grad=grads[2 * index + 1])
        step.objective = functools.partial(_surrogate, call.temperature, step.model.language_config.vocab_size)
        try:
            step.run(list(chunks), batch, micro_batch_size, None, forward_only=False,
                     finalize_grads=finalize_grads and index == len(calls) - 1)
        finally:
            step.objective = None


def _surrogate(temperature: float, vocab_size: int, micro: dict, logits: torch.Tensor):
    """sum(g_logp · log p + g_entropy · entropy) over a micro-batch, from this rank's logits shard [s, b, v / tp]."""
    targets = shifted_targets(micro["labels"])  # padded to the schedule's sequence (sequence parallelism)
    statistics = token_statistics(logits[: targets.shape[1]], targets, vocab_size, temperature)
    surrogate = logits.new_zeros((), dtype=torch.float32)
    for name in ("log_probs", "entropy"):
        grad = micro[f"{name}_grad"]
        grad = nn.functional.pad(grad, (0, targets.shape[1] - grad.shape[1]))
        surrogate = surrogate + (statistics[name] * grad).sum()
    tokens = targets.ne(IGNORE_INDEX).sum()
    record = {"loss": surrogate.detach().double(), "loss_sum": surrogate.detach().double() * 0, "tokens": tokens.double()}
    return surrogate, tokens.int(), record
