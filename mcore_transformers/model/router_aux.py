"""transformers' MoE load-balancing loss (`load_balancing_loss_func`) on megatron-core's routers.

transformers (Switch Transformer, eqs. 4-6) pools over every layer's tokens the top-k assignment
counts c_e, the softmax probabilities p_e and the (unmasked) rows R of one forward, then adds
coefficient × E · Σ_e (c_e / R) · (p_e / R): one product of pooled statistics, not a sum over layers.
The counts carry no gradient, so the loss is linear in p once c and R are known: each rank, layer and
micro-batch contributes E · Σ_e (c_e / R) · (p_e,local / R), and those shares add up to the loss.

Two ways to know c and R in time:
- one forward holds the whole batch and every layer (pp = 1, one micro-batch per device batch):
  `recording_router_logits` + `load_balancing_loss` after that forward;
- otherwise (pipeline stages, several micro-batches) `PooledRouting`: a forward-only pass over the
  batch counts c, p and R first (its RNG replayed so the routing is the same), then every router's
  forward hook attaches its share's gradient to the probabilities it returns.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from .forward import bare_chunk


@dataclass(frozen=True)
class RouterAuxLoss:
    """transformers' MoE load-balancing loss, added as `coefficient` × loss.

    `experts` / `top_k` as transformers counts them; `groups` are the process groups over which the
    tokens of one loss are split (data-parallel replicas, tensor-parallel ranks under sequence
    parallelism) or its layers (pipeline stages): their statistics are summed over them.
    """

    experts: int
    top_k: int
    coefficient: float
    groups: tuple = ()


def router_aux_loss_of(model) -> Optional[tuple[int, int, float]]:
    """(experts, top_k, coefficient) when `model.config.output_router_logits` asks for the aux loss, else None."""
    if not getattr(model.config, "output_router_logits", False):
        return None
    spec = getattr(model.arch, "router_aux_loss", None)
    return spec() if spec is not None else None


def _routers(chunks: Sequence[nn.Module]) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for chunk in chunks for m in bare_chunk(chunk).modules() if isinstance(m, TopKRouter)]


@contextlib.contextmanager
def _hooked(chunks: Sequence[nn.Module], hook) -> Iterator[None]:
    handles = [router.register_forward_hook(hook) for router in _routers(chunks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def recording_router_logits(chunks: Sequence[nn.Module]) -> Iterator[list]:
    """Collect every MoE layer's router logits ([tokens..., experts], graph kept) while the block runs.

    A forward hook on megatron's TopKRouter evaluates the router's own `gating` again on the router's
    input: one [tokens, hidden] × [hidden, experts] product, the same numbers as the logits the router
    routed with, with their autograd graph (megatron's router returns only probabilities and the map).
    """
    recorded: list = []
    with _hooked(chunks, lambda module, args, output: recorded.append(module.gating(args[0]))):
        yield recorded


def router_token_mask(attention_mask: Optional[torch.Tensor], sequence_parallel: bool) -> Optional[torch.Tensor]:
    """HF's padding mask [b, s] as the router sees its tokens: [s_local · b] in megatron's [s, b] order.

    Under sequence parallelism each tensor-parallel rank routes its own slice of the sequence.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.transpose(0, 1)
    if sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
        size = mask.shape[0] // ps.get_tensor_model_parallel_world_size()
        start = ps.get_tensor_model_parallel_rank() * size
        mask = mask[start : start + size]
    return mask.reshape(-1).float()


def routing_statistics(
    logits: torch.Tensor, spec: RouterAuxLoss, token_mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's (counts [E], probability sums [E] with their graph, rows) over its unmasked tokens."""
    experts = spec.experts
    weights = nn.functional.softmax(logits.reshape(-1, experts), dim=-1)  # in the logits' dtype, as HF
    _, selected = torch.topk(weights, spec.top_k, dim=-1)
    mask = token_mask if token_mask is not None else torch.ones(weights.shape[0], device=weights.device)
    mask = mask.to(device=weights.device, dtype=torch.float32)
    counts = torch.zeros(experts, dtype=torch.float32, device=weights.device)
    counts = counts.scatter_add(0, selected.reshape(-1), mask.repeat_interleave(spec.top_k))
    return counts, (weights.float() * mask[:, None]).sum(0), mask.sum()


def _all_reduce(totals: torch.Tensor, groups) -> torch.Tensor:
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(totals, group=group)
    return totals


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], spec: RouterAuxLoss, token_mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `load_balancing_loss_func` over all layers' router logits of one forward, across
    `spec.groups`. Returns (loss, this rank's differentiable share), both fp32."""
    experts = spec.experts
    device = router_logits[0].device if router_logits else torch.device("cpu")
    counts = torch.zeros(experts, dtype=torch.float32, device=device)
    probs = torch.zeros(experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits in router_logits:
        layer_counts, layer_probs, layer_rows = routing_statistics(logits, spec, token_mask)
        counts, probs, rows = counts + layer_counts, probs + layer_probs, rows + layer_rows
    totals = _all_reduce(torch.cat([counts, probs.detach(), rows[None]]), spec.groups)
    counts, all_probs, rows = totals[:experts], totals[experts : 2 * experts], totals[-1]
    loss = torch.sum((counts / rows) * (all_probs / rows)) * experts
    return loss, torch.sum((counts / rows) * experts * (probs / rows))


class _AddGradientOf(torch.autograd.Function):
    """Identity on `x`; in backward, `term` receives gradient 1: `term`'s graph joins the backward pass
    wherever `x` is used (the router's probabilities, which weight the experts' outputs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=torch.float32, device=grad.device)


class PooledRouting:
    """The aux loss when no single forward sees the whole batch on every layer.

    `count(run_forward)` runs the batch forward-only with counting hooks (the RNG state restored
    afterwards, so the training pass routes identically) and sums c, p, R over this rank's layers and
    micro-batches, then over `spec.groups` and the pipeline stages: `value` is transformers' loss.
    `attaching(chunks, mask_of)` then hooks every router for the training pass: from the logits it
    routed with it computes the share coefficient · E · Σ_e (c_e / R) · (p_e,local / R) (times the fp16
    loss scale) and attaches its gradient to the router's returned probabilities.
    """

    def __init__(self, spec: RouterAuxLoss, chunks: Sequence[nn.Module], loss_scale: Callable[[], float]):
        self.spec = spec
        self.chunks = chunks
        self.loss_scale = loss_scale
        self.counts: Optional[torch.Tensor] = None
        self.rows: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None

    def count(self, run_forward: Callable[[], list], mask_of: Callable[[], Optional[torch.Tensor]]) -> list:
        experts = self.spec.experts
        totals = torch.zeros(2 * experts + 1, dtype=torch.float32)

        def hook(module, args, output):
            counts, probs, rows = routing_statistics(module.gating(args[0]).detach(), self.spec, mask_of())
            totals.add_(torch.cat([counts, probs, rows[None]]).to(totals.device))

        with torch.no_grad(), _replayed_rng(), _hooked(self.chunks, hook):
            outputs = run_forward()
        groups = tuple(self.spec.groups)
        if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
            groups += (ps.get_pipeline_model_parallel_group(),)
        totals = _all_reduce(totals, groups)
        self.counts, probs, self.rows = totals[:experts], totals[experts : 2 * experts], totals[-1]
        self.value = torch.sum((self.counts / self.rows) * (probs / self.rows)) * experts
        return outputs

    @contextlib.contextmanager
    def attaching(self, mask_of: Callable[[], Optional[torch.Tensor]]) -> Iterator[None]:
        spec = self.spec

        def hook(module, args, output):
            probs, routing_map = output
            _, local_probs, _ = routing_statistics(module.gating(args[0]), spec, mask_of())
            counts, rows = self.counts.to(local_probs.device), self.rows.to(local_probs.device)
            share = torch.sum((counts / rows) * spec.experts * (local_probs / rows))
            return _AddGradientOf.apply(probs, spec.coefficient * self.loss_scale() * share), routing_map

        with _hooked(self.chunks, hook):
            yield


@contextlib.contextmanager
def _replayed_rng() -> Iterator[None]:
    """Run a block, then put every RNG back: torch's (CPU and CUDA) and megatron's named streams."""
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random.get_cuda_rng_tracker()
    streams = tracker.get_states()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        yield
    tracker.set_states(streams)



def router_aux_outputs(layout, spec, router_logits, attention_mask, batch: int):
    """transformers' load-balancing loss over one forward's tokens (every MoE layer, every stage), and the
    router logits transformers returns.

    The value is summed over pipeline stages (layers) and, under sequence parallelism, over the
    tensor-parallel ranks (tokens); its gradient (pipeline size 1) flows through this rank's logits.
    The router logits come as transformers returns them ([b·s, experts] per MoE layer) where this
    rank routed every token (no pipeline or sequence split); otherwise None.
    """
    sequence_parallel = layout.sequence_parallel and layout.tp > 1
    groups = []
    if sequence_parallel:
        groups.append(ps.get_tensor_model_parallel_group())
    if layout.pp > 1:
        groups.append(ps.get_pipeline_model_parallel_group())
    mask = router_token_mask(attention_mask, sequence_parallel)
    aux_loss, share = load_balancing_loss(router_logits, RouterAuxLoss(*spec, groups=tuple(groups)), mask)
    if share.requires_grad:
        aux_loss = aux_loss + (share - share.detach())  # the value of the whole, the gradient of this share
    routers = None
    if not sequence_parallel and layout.pp == 1:
        routers = tuple(r.transpose(0, 1).reshape(batch * r.shape[0], -1) for r in router_logits)  # [s, b, E] → [b·s, E]
    return aux_loss, routers
