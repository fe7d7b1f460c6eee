"""One HF (micro-)batch through megatron-core's pipeline schedule: forward, HF-semantics loss, backward.

The batch is cut into equal row slices (`micro_batch_size` rows each) that the schedule pipelines (1F1B, interleaved
under vpp; a plain loop without pipeline parallelism). The loss of every micro-batch is
`sum of token cross-entropies / num_items`, where `num_items` counts the valid (-100-free, shifted)
labels of the whole optimizer step over all data-parallel replicas: exactly the number transformers'
Trainer divides by, so the gradients summed over micro-batches, accumulation steps and replicas are the
gradients of the global mean loss.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import nn

from ..model.forward import ForwardInputs, attention_mask_for, bare_chunk, packed_segments, run_chunk
from ..model.token_statistics import IGNORE_INDEX, shifted_targets
from .errors import TrainingError
from ..model.router_aux import (
    PooledRouting,
    RouterAuxLoss,
    load_balancing_loss,
    recording_router_logits,
    router_aux_loss_of,
    router_token_mask,
)



@dataclass
class StepResult:
    """What one call of the schedule measured, reduced over the whole model (every rank holds it)."""

    loss: torch.Tensor  # fp64 sum of the micro-batch losses (each divided by the divisor) over all replicas
    loss_sum: torch.Tensor  # fp64 sum of token losses over the micro-batches of all data-parallel replicas
    tokens: torch.Tensor  # fp64 number of valid tokens they covered
    aux: Optional[torch.Tensor] = None  # fp64 sum of the micro-batches' load-balancing losses (uncoefficiented)


def count_valid_targets(labels: torch.Tensor) -> torch.Tensor:
    """The tokens transformers' Trainer counts in `num_items_in_batch` for a causal LM."""
    return labels[..., 1:].ne(IGNORE_INDEX).sum()


def pad_sequence_to(batch: dict, multiple: int) -> dict:
    """Right-pad every [b, s] tensor to a multiple of `multiple` (sequence parallelism): masked, ignored."""
    seq = batch["input_ids"].shape[1]
    extra = -seq % multiple
    if not extra:
        return batch
    padded = dict(batch)
    padded["input_ids"] = nn.functional.pad(batch["input_ids"], (0, extra))
    padded["labels"] = nn.functional.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
    mask = batch.get("attention_mask")
    if mask is not None:  # without one, the tail is invisible anyway: it comes after every real token
        padded["attention_mask"] = nn.functional.pad(mask, (0, extra))
    positions = batch.get("position_ids")
    if positions is not None:
        tail = positions[..., -1:] + torch.arange(1, extra + 1, device=positions.device)
        padded["position_ids"] = torch.cat([positions, tail], -1)
    types = batch.get("mm_token_type_ids")  # a multimodal batch's token kinds: the padding is text
    if types is not None:
        padded["mm_token_type_ids"] = nn.functional.pad(types, (0, extra))
    return padded


def micro_batch_count(rows: int, wanted: int, pp: int, interleaved: bool) -> int:
    """`wanted` when it divides `rows`; for a ragged (last) batch, the largest count that does.

    The interleaved schedule needs at least pp micro-batches; 1 is always possible otherwise.
    """
    for count in range(min(wanted, rows), 0, -1):
        if rows % count == 0 and (not interleaved or count >= pp):
            return count
    raise TrainingError(
        f"A batch of {rows} rows cannot feed the interleaved pipeline schedule (vpp), which needs at least "
        f"pp={pp} micro-batches of equal size. Use a per-device batch size that is a multiple of {pp}, or "
        "dataloader_drop_last=True so that no short last batch reaches the pipeline."
    )


def vocab_parallel_token_losses(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token cross-entropy [s, b] (fp32) from this rank's vocabulary shard [s, b, V_pad / tp].

    The vocabulary rows added for tensor-parallel padding are excluded from the softmax, so the loss is
    the one over the `vocab_size` real tokens (as transformers computes it). Ignored targets give 0.
    """
    logits = logits.float()
    shard = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * shard
    real = max(0, min(shard, vocab_size - start))
    if real < shard:
        padding = torch.arange(shard, device=logits.device) >= real
        logits = logits.masked_fill(padding, float("-inf"))
    valid = targets.ne(IGNORE_INDEX)
    if ps.get_tensor_model_parallel_world_size() == 1:  # the whole vocabulary here: torch's fused kernel
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, shard), targets.clamp(min=0).reshape(-1), reduction="none"
        ).view_as(targets)
    else:
        losses = vocab_parallel_cross_entropy(logits, targets.clamp(min=0).contiguous())
    return losses * valid


def router_aux_loss_for(model) -> Optional[RouterAuxLoss]:
    """transformers' MoE load-balancing loss when `config.output_router_logits` asks for it (None otherwise).

    Computed over each micro-step's whole batch (every data-parallel replica, every TP rank's slice
    of the sequence, every pipeline stage's layers), so the value and gradient are transformers' on
    the global batch. When one forward does not hold the whole batch on every layer (pp > 1, several
    micro-batches) a counting forward runs first (router_aux.PooledRouting). Refused under
    activation checkpointing: a recomputed router cannot tell which micro-batch's padding it routes.
    """
    spec = router_aux_loss_of(model)
    if spec is None:
        return None
    layout, config = model.layout, model.chunks[0].config
    if config.recompute_granularity is not None:
        raise TrainingError(
            "config.output_router_logits=True (transformers' MoE load-balancing loss) is not supported with "
            "activation checkpointing: the recomputed routers' logits would be paired with another micro-batch's "
            "padding. Train without gradient_checkpointing, or set model.config.output_router_logits=False "
            "(cross-entropy only)."
        )
    groups = [ps.get_data_parallel_group()] if dist.is_initialized() else []
    if layout.sequence_parallel and layout.tp > 1:
        groups.append(ps.get_tensor_model_parallel_group())
    return RouterAuxLoss(*spec, groups=tuple(groups))


class PipelineStep:
    """Runs forward (+ backward) of one batch over this rank's model chunks with megatron's schedule.

    `chunks` are the modules the schedule drives (megatron DDP wrappers while training, the bare
    GPTModel chunks for evaluation); `model` is the MCoreModelForCausalLM they belong to.
    """

    def __init__(self, model):
        self.model = model
        self.layout = model.layout
        self.window = model.arch.sliding_window()
        # transformers' MoE load-balancing loss (config.output_router_logits); set by the trainer per run.
        self.aux: Optional[RouterAuxLoss] = None
        self._record_router = False  # the aux loss from this forward's own router logits (one pass)
        self._router_mask: Optional[torch.Tensor] = None  # the running micro-batch's tokens, as routers see them
        self.kv_copies = None  # replicated KV heads (kv_copies.KVHeadCopies); set by the trainer
        # another loss than the causal-LM one: objective(micro_batch, logits_shard) -> (loss, tokens, record) (replay.py)
        self.objective = None

    # -- the two functions the schedule calls -----------------------------------------------------
    def _forward_step(self, data_iterator, chunk_module, *, divisor: torch.Tensor):
        batch = next(data_iterator)
        chunk = bare_chunk(chunk_module)
        input_ids = batch["input_ids"]
        rows, seq = input_ids.shape
        positions, edits = self.model.step_inputs(batch, chunk.pre_process)
        packed = batch.get("attention_mask") is None and positions.dim() == 2 and "position_ids" in batch
        inputs = ForwardInputs(
            input_ids=input_ids,
            attention_mask=attention_mask_for(
                batch.get("attention_mask"), rows, seq, self.window, input_ids.device,
                segments=packed_segments(batch["position_ids"]) if packed else None,
            ),
            rotary=self.model.rotary_angles_for(positions),
            edits=edits,
        )
        # Past the first stage the schedule has already handed the received activations to the decoder.
        hidden = None if chunk.pre_process else chunk.decoder.input_tensor
        if isinstance(hidden, list):
            hidden = hidden[0]
        router = None
        if self.aux is not None:
            self._router_mask = router_token_mask(batch.get("attention_mask"), self.layout.sequence_parallel)
        if self._record_router:
            with recording_router_logits([chunk]) as router_logits:
                output = run_chunk(chunk, inputs, hidden)
            router = (router_logits, self._router_mask)
        else:
            output = run_chunk(chunk, inputs, hidden)
        if self.objective is not None:
            return output, functools.partial(self.objective, batch)
        return output, functools.partial(self._loss, shifted_targets(batch["labels"]), divisor, router)

    def _loss(self, targets: torch.Tensor, divisor: torch.Tensor, router, logits: torch.Tensor):
        losses = vocab_parallel_token_losses(logits, targets.transpose(0, 1), self.model.language_config.vocab_size)
        loss_sum = losses.sum()
        tokens = targets.ne(IGNORE_INDEX).sum()
        # With config.calculate_per_token_loss the schedule leaves this loss as it is: `divisor` is
        # num_items of the whole optimizer step (see the module docstring).
        loss = loss_sum / divisor
        record = {"loss": loss.detach().double(), "loss_sum": loss_sum.detach().double(), "tokens": tokens.double()}
        if router is not None:
            # transformers adds coefficient × aux to each forward's loss (not divided by accumulation):
            # the aux loss of this micro-step's whole batch, its gradient shared out over the ranks.
            aux, share = load_balancing_loss(router[0], self.aux, router[1])
            loss = loss + self.aux.coefficient * share
            record["aux"] = aux.detach().double()
        return loss, tokens.int(), record

    # -- driving the schedule ---------------------------------------------------------------------
    def run(
        self,
        chunks: Sequence[nn.Module],
        batch: dict,
        micro_batch_size: int,
        divisor: Optional[torch.Tensor],
        forward_only: bool,
        finalize_grads: bool = False,
    ) -> StepResult:
        tp = self.layout.tp
        if self.layout.sequence_parallel:
            batch = pad_sequence_to(batch, tp)
        rows, seq = batch["input_ids"].shape
        interleaved = self.layout.virtual_stages > 1
        count = micro_batch_count(rows, -(-rows // micro_batch_size), self.layout.pp, interleaved)
        micro = self.model.micro_batches(batch, count)
        if divisor is None:
            divisor = torch.ones((), dtype=torch.float32, device=batch["input_ids"].device)
        config = bare_chunk(chunks[0]).config
        config.finalize_model_grads_func = (
            functools.partial(_finalize_without_token_scaling, kv_copies=self.kv_copies) if finalize_grads else None
        )
        if self.layout.pp > 1 and dist.get_backend() == "gloo":
            # Batched p2p posts both directions between two pipeline ranks on one communicator; gloo
            # pairs same-peer messages by posting order, so at pp=2 the interleaved schedule would
            # receive a gradient as an activation. Unbatched ops give each direction its own group.
            config.batch_p2p_comm = False

        def schedule(forward_only: bool) -> list:
            iterators = [iter(micro) for _ in chunks]
            return get_forward_backward_func()(
                forward_step_func=functools.partial(self._forward_step, divisor=divisor),
                data_iterator=iterators if len(chunks) > 1 else iterators[0],
                model=list(chunks),
                num_microbatches=count,
                seq_length=seq,
                micro_batch_size=rows // count,
                forward_only=forward_only,
            )

        # The aux loss from one forward's router logits needs the whole batch on every layer in one pass;
        # otherwise a counting pass first (router_aux.PooledRouting).
        pooled = None
        self._record_router = self.aux is not None and self.layout.pp == 1 and count == 1
        if self.aux is not None and not self._record_router:
            pooled = PooledRouting(self.aux, chunks, _loss_scale(config))
            counted = pooled.count(lambda: schedule(forward_only=True), lambda: self._router_mask)
            if forward_only:
                return self._reduce(counted, batch["input_ids"].device, pooled)
        with pooled.attaching(lambda: self._router_mask) if pooled is not None else contextlib.nullcontext():
            outputs = schedule(forward_only)
        return self._reduce(outputs, batch["input_ids"].device, pooled)

    def _reduce(self, outputs: list, device, pooled: Optional[PooledRouting] = None) -> StepResult:
        """Sum the last stage's measurements over data-parallel replicas; every rank gets the totals.

        One all-reduce over the world: the first tensor-parallel rank of each replica's last pipeline
        stage contributes its sums, every other rank zeros.
        """
        totals = torch.zeros(4, dtype=torch.float64, device=device)
        contributes = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
        if contributes:
            for record in outputs:
                totals[0] += record["loss"]
                totals[1] += record["loss_sum"]
                totals[2] += record["tokens"]
        if self.aux is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            # The aux loss is already the whole batch's, the same on every rank: counted once.
            totals[3] = pooled.value.double() if pooled is not None else sum(record["aux"] for record in outputs)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        if self.aux is None:
            return StepResult(loss=totals[0], loss_sum=totals[1], tokens=totals[2])
        loss = totals[0] + self.aux.coefficient * totals[3]
        return StepResult(loss=loss, loss_sum=totals[1], tokens=totals[2], aux=totals[3])


def _loss_scale(config):
    """The fp16 loss scale megatron's schedule multiplies the loss by (1 without loss scaling)."""
    scale = config.grad_scale_func
    return (lambda: float(scale(torch.ones(())))) if scale is not None else (lambda: 1.0)


def _finalize_without_token_scaling(model, num_tokens=None, pg_collection=None, force_all_reduce=False, *,
                                    kv_copies=None):
    """finalize_model_grads with the losses already divided by the step's token count (not by mcore); replicated
    KV heads' gradients merged first (kv_copies.py)."""
    if kv_copies is not None:
        kv_copies.merge_grads()
    finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)

