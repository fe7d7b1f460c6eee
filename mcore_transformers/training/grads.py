"""Gradients of a sharded model: megatron-core DDP grad buffers, the global norm, clipping, fp32 masters.

megatron-core's `DistributedDataParallel` keeps each chunk's gradients in one contiguous buffer
(`param.main_grad`), reduces it over the data-parallel group in `finalize_model_grads`, and
all-reduces what TP/PP replicate (tied embeddings across stages, sequence-parallel norms).
With megatron-core's optimizer (optimizer.py) the gradients go from the buffers to the optimizer
there; `ShardedGrads` serves the other path, a torch optimizer built by transformers (optimizers
megatron lacks, PEFT adapters outside megatron's modules).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared
from torch import nn

from ..model.building import mark_tensor_parallel_weights  # noqa: F401  (re-exported for the trainer)


def wrap_chunks(
    chunks: Iterable[nn.Module], fp32_grads: bool, distributed_optimizer: bool = False
) -> list[DistributedDataParallel]:
    """One megatron DDP per chunk (virtual stage), replicas made identical from data-parallel rank 0.
    For the distributed optimizer the buffers are reduce-scattered (each rank keeps its shard)."""
    wrapped = []
    for index, chunk in enumerate(chunks):
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=fp32_grads, overlap_grad_reduce=False, use_distributed_optimizer=distributed_optimizer
        )
        ddp = DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0)
        ddp.broadcast_params()
        wrapped.append(ddp)
    return wrapped


class EvalModule(nn.Module):
    """What the Trainer evaluates with when no training wrapper exists: the user's model, unwrapped,
    so that accelerate does not put a torch DDP around it. Attributes it lacks are the model's (TRL asks the wrapped
    model for `is_gradient_checkpointing`, `generate`, ...: accelerate's unwrap_model does not know this wrapper)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


class TrainingModule(EvalModule):
    """What transformers' Trainer holds as its wrapped model while training: the user's model plus the
    megatron DDP wrappers of its chunks. `zero_grad` (`zero`) clears the grad buffers and the optimizer's grads."""

    def __init__(self, model: nn.Module, ddp_chunks: list[DistributedDataParallel], zero: Callable[[], None]):
        super().__init__(model)
        self.ddp_chunks = nn.ModuleList(ddp_chunks)
        self._zero = zero

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._zero()


class ShardedGrads:
    """The trainable parameters of this rank and the tensors the optimizer steps (the parameters
    themselves, or fp32 master copies when the model computes in bf16/fp16).

    After `finalize_model_grads`, `publish()` points each optimizer tensor's `.grad` at the reduced
    `main_grad` (no copy); `norm()` / `clip()` compute the global L2 norm the way megatron does;
    `zero()` empties the buffers for the next step.
    """

    def __init__(
        self, params: list[nn.Parameter], ddp_chunks: list[DistributedDataParallel], masters: bool, has_experts: bool
    ):
        self.params = params
        self.ddp_chunks = ddp_chunks
        self.masters = masters
        self.has_experts = has_experts
        # Trainable parameters outside the chunks (e.g. LoRA adapters hung on an HF-named view):
        # megatron DDP does not see them; their .grad accumulates as usual and is summed over
        # data-parallel replicas here.
        in_chunks = {id(p) for ddp in ddp_chunks for p in ddp.module.parameters()}
        self.extras = [p for p in params if id(p) not in in_chunks]
        if masters:
            self.targets = [nn.Parameter(p.detach().float().clone()) for p in params]
        else:
            self.targets = list(params)
        self.target_of = {id(p): t for p, t in zip(params, self.targets)}

    def reduce_extras(self) -> None:
        if self.extras and ps.get_data_parallel_world_size() > 1:
            for param in self.extras:
                if param.grad is not None:
                    dist.all_reduce(param.grad, group=ps.get_data_parallel_group())

    def publish(self) -> None:
        extras = {id(p) for p in self.extras}
        for param, target in zip(self.params, self.targets):
            grad = param.grad if id(param) in extras else param.main_grad
            if grad is None or target is param and grad is param.grad:
                continue
            target.grad = grad if grad.dtype == target.dtype else grad.to(target.dtype)

    def zero(self) -> None:
        for ddp in self.ddp_chunks:
            ddp.zero_grad_buffer()
        for param, target in zip(self.params, self.targets):
            param.grad = None
            target.grad = None

    @torch.no_grad()
    def copy_masters_to_model(self) -> None:
        """After an optimizer step on fp32 masters: the model's bf16/fp16 weights follow them."""
        for param, target in zip(self.params, self.targets):
            if target is not param:
                param.copy_(target)

    @torch.no_grad()
    def norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients over every rank of the model, each element counted once.

        Tensor-parallel shards count on every rank; parameters replicated over TP count on TP rank 0;
        a tied output layer's copy on the last pipeline stage (`shared`) is not counted again. Dense
        parameters reduce over the model-parallel group, experts over the expert group (as megatron).
        """
        device = self.targets[0].device if self.targets else torch.device("cpu")
        dense = torch.zeros((), dtype=torch.float64, device=device)
        expert = torch.zeros((), dtype=torch.float64, device=device)
        expert_tp_rank = ps.get_expert_tensor_parallel_rank() if self.has_experts else 0
        for param, target in zip(self.params, self.targets):
            grad = target.grad
            if grad is None or not param_is_not_shared(param):
                continue
            is_expert = not getattr(param, "allreduce", True)
            sharded = getattr(param, "tensor_model_parallel", False)
            if is_expert and not (sharded or expert_tp_rank == 0):
                continue
            if not is_expert and not param_is_not_tensor_parallel_duplicate(param):
                continue
            square = grad.detach().double().square().sum()
            if is_expert:
                expert += square
            else:
                dense += square
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(dense, group=ps.get_model_parallel_group())
            if self.has_experts:
                dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
        return (dense + expert).sqrt().float()

    @torch.no_grad()
    def clip(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so that their global norm is at most `max_norm` (torch's formula)."""
        total = self.norm()
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for target in self.targets:
            if target.grad is not None:
                target.grad.mul_(coefficient.to(target.grad.dtype))
        return total


def swap_optimizer_params(optimizer: torch.optim.Optimizer, grads: ShardedGrads) -> None:
    """Point an optimizer built over the model's parameters at the fp32 masters instead (before any step)."""
    for group in optimizer.param_groups:
        group["params"] = [grads.target_of.get(id(p), p) for p in group["params"]]
    optimizer.register_step_post_hook(lambda *_: grads.copy_masters_to_model())


class ModelParallelGradScaler(torch.amp.GradScaler):
    """torch's dynamic loss scaler (what transformers' Trainer uses for fp16 through accelerate) for a
    model sharded over ranks: the overflow check is agreed by every rank.

    Same semantics as torch.amp.GradScaler: the backward pass runs on loss × scale (megatron's
    schedule calls `config.grad_scale_func`, which is `scale`); `unscale_` divides the fp32 master
    gradients by the scale and looks for inf/nan; `step` skips the optimizer step when one was found;
    `update` halves the scale after a skipped step (backoff_factor) and doubles it after
    growth_interval clean steps. A plain GradScaler judges only this rank's gradients, so one
    tensor-parallel shard overflowing would make that rank skip the step while the others take it.
    Here the finding is all-reduced (max) over every rank before anyone decides; `found_overflow`
    keeps the last step's verdict (the same on every rank).

    With a fused optimizer (transformers' default adamw_torch_fused) torch hands the verdict to the
    optimizer, which skips the update itself; accelerate then does not notice the skip and the learning
    rate scheduler advances: transformers' own behaviour on a GPU, kept as it is.
    """

    found_overflow: bool = False

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        found = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        agreed = found_inf.clone()
        for value in found.values():
            agreed = agreed + value.to(agreed.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        self.found_overflow = bool(agreed.item())
        return {agreed.device: agreed}
