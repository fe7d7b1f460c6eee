"""A megatron linear running its base weight and the LoRA adapters of its HF projections in one pass.

Storage: each LoRA layer keeps HF's full-shape A [r, in] and B [out, r], replicated on the
tensor-parallel ranks of its linear (equal at creation: broadcast; equal after every step: their
gradients are summed over the group). Computation is split exactly like the base weight:

- column-parallel (`linear_qkv`, `linear_fc1`): A whole on every rank, B restricted to the output
  rows this rank holds, in the local weight's own order (q/k/v rows per query group; replicated KV
  heads use the same B rows on every replica). One communication for base + LoRA: the input is
  copied (or all-gathered under sequence parallelism) once and both use it.
- row-parallel (`linear_proj`, `linear_fc2`): A restricted to this rank's input columns, B whole;
  the LoRA partial sum is added to the base partial sum before the single all-reduce
  (reduce-scatter under sequence parallelism).

The linear's own `forward` runs whenever no unmerged adapter is active, so a model without LoRA,
with adapters disabled, or merged, takes megatron's path unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    scatter_to_tensor_model_parallel_region,
)
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..model.fast_layers import finish_row_parallel


class _SumGradients(torch.autograd.Function):
    """Identity forward; backward sums every gradient over `group`, one all-reduce per dtype."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        grads = list(grads)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, grad in enumerate(grads):
            if grad is not None:
                by_dtype.setdefault(grad.dtype, []).append(i)
        for indices in by_dtype.values():
            flat = _flatten_dense_tensors([grads[i] for i in indices])
            dist.all_reduce(flat, group=ctx.group)
            for i, summed in zip(indices, _unflatten_dense_tensors(flat, [grads[i] for i in indices])):
                grads[i] = summed
        return (None, *grads)


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _dropout_active(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0


class LoraHost:
    """One megatron linear and the HF projections it computes (`parts`: view node, slot name, Projection)."""

    def __init__(self, linear: nn.Module, kind: Optional[str], name: str, view):
        self.linear = linear
        self.kind = kind  # "column", "row", or None when LoRA is not supported on this linear
        self.name = name
        self.view = view
        self.parts: list[tuple[nn.Module, str, object]] = []
        self._inverse: Optional[torch.Tensor] = None

    @property
    def group(self):
        return getattr(self.linear, "tp_group", None)

    def finish(self) -> None:
        """Precompute how concatenated per-projection outputs map onto the local output order."""
        if self.kind != "column" or not self.parts:
            return
        order = torch.cat([projection.local_index for _, _, projection in self.parts])
        if not torch.equal(order, torch.arange(order.numel())):
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel())
            self._inverse = inverse

    def replica_groups(self) -> list:
        """The groups whose ranks hold this same linear: its tensor-parallel group, then the data-parallel
        one (expert-data-parallel for routed experts; under expert parallelism attention has dp > 1)."""
        groups = [self.group]
        try:
            if getattr(self.linear, "is_expert", False):
                groups.append(ps.get_expert_data_parallel_group())
            else:
                groups.append(ps.get_data_parallel_group(with_context_parallel=True))
        except (AssertionError, RuntimeError):  # parallel state not initialised: a single process
            pass
        return [group for group in groups if _group_size(group) > 1]

    def writes_adapters(self) -> bool:
        """Whether this rank writes this linear's adapters on export (one rank per linear and stage)."""
        if getattr(self.linear, "is_expert", False):
            return ps.get_expert_tensor_parallel_rank() == 0 and ps.get_expert_data_parallel_rank() == 0
        return ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0

    # ---- the forward override ------------------------------------------------------------------
    def install(self) -> None:
        """Route the linear's calls through this host (an instance attribute; `uninstall` removes it)."""
        if "forward" not in self.linear.__dict__:
            self.linear.forward = self._column_forward if self.kind == "column" else self._row_forward

    def uninstall(self) -> None:
        self.linear.__dict__.pop("forward", None)

    def _megatron_forward(self, *args, **kwargs):
        return type(self.linear).forward(self.linear, *args, **kwargs)

    def _active(self) -> list[tuple[int, nn.Module, list[str]]]:
        """(part index, LoRA layer, adapter names) for each projection with unmerged active adapters."""
        found = []
        for index, (node, name, _) in enumerate(self.parts):
            layer = node._modules[name]
            if not getattr(layer, "is_mcore_projection_lora", False):
                continue
            if layer.disable_adapters:
                if layer.merged:
                    layer.unmerge()  # peft's semantics: disabling un-merges
                continue
            if layer.merged:
                continue  # peft's semantics: merged weights only, other active adapters are not added
            names = [adapter for adapter in layer.active_adapters if adapter in layer.lora_A]
            if names:
                found.append((index, layer, names))
        return found

    def _weights(self, active) -> dict[int, torch.Tensor]:
        """The LoRA weights this pass uses; under TP their gradients are summed over the group."""
        tensors = [
            weight
            for _, layer, names in active
            for adapter in names
            for weight in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
        ]
        if _group_size(self.group) > 1 and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            used = _SumGradients.apply(self.group, *tensors)
        else:
            used = tensors
        return {id(original): tensor for original, tensor in zip(tensors, used)}

    def _column_forward(self, input_, weight=None, runtime_gather_output=None):
        active = self._active() if weight is None else []
        if not active:
            return self._megatron_forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        self.view.check_configs()
        linear = self.linear
        if linear.sequence_parallel and not linear.explicit_expert_comm:
            x = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=linear.tp_group)
        elif linear.explicit_expert_comm or linear.disable_grad_reduce:
            x = input_
        else:
            x = copy_to_tensor_model_parallel_region(input_, group=linear.tp_group)
        bias = linear.bias if not linear.skip_bias_add else None
        output = F.linear(x, linear.weight, bias)
        output = output + self._column_delta(x, active).to(output.dtype)
        gather = linear.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            output = gather_from_tensor_model_parallel_region(output, group=linear.tp_group)
        return output, (linear.bias if linear.skip_bias_add else None)

    def _column_delta(self, x: torch.Tensor, active) -> torch.Tensor:
        weights = self._weights(active)
        entries = [(index, layer, adapter) for index, layer, names in active for adapter in names]
        hidden = {}
        # Adapters without active dropout see the same x: one matmul with their A's stacked
        # (q, k and v of a fused linear_qkv share it).
        plain = [e for e in entries if not _dropout_active(e[1].lora_dropout[e[2]])]
        by_dtype: dict[torch.dtype, list] = {}
        for entry in plain:
            by_dtype.setdefault(weights[id(entry[1].lora_A[entry[2]].weight)].dtype, []).append(entry)
        for dtype, group in by_dtype.items():
            stacked = [weights[id(layer.lora_A[adapter].weight)] for _, layer, adapter in group]
            outputs = F.linear(x.to(dtype), torch.cat(stacked) if len(stacked) > 1 else stacked[0])
            for entry, part in zip(group, outputs.split([a.shape[0] for a in stacked], -1)):
                hidden[entry] = part
        for entry in entries:
            if entry not in hidden:
                _, layer, adapter = entry
                lora_a = weights[id(layer.lora_A[adapter].weight)]
                # x is the same on every rank of the group, so dropout draws from the shared default
                # generator (as megatron's hidden dropout does without sequence parallelism).
                hidden[entry] = F.linear(layer.lora_dropout[adapter](x.to(lora_a.dtype)), lora_a)

        pieces: list[Optional[torch.Tensor]] = [None] * len(self.parts)
        for entry in entries:
            index, layer, adapter = entry
            rows = self.parts[index][2].hf_index.to(x.device)
            lora_b = weights[id(layer.lora_B[adapter].weight)].index_select(0, rows)
            delta = F.linear(hidden[entry], lora_b) * layer.scaling[adapter]
            pieces[index] = delta if pieces[index] is None else pieces[index] + delta
        dtype = next(piece.dtype for piece in pieces if piece is not None)
        for index, piece in enumerate(pieces):
            if piece is None:
                width = self.parts[index][2].local_index.numel()
                pieces[index] = x.new_zeros((*x.shape[:-1], width), dtype=dtype)
        delta = torch.cat(pieces, -1) if len(pieces) > 1 else pieces[0]
        if self._inverse is not None:
            delta = delta.index_select(-1, self._inverse.to(x.device))
        return delta

    def _row_forward(self, input_):
        active = self._active()
        if not active:
            return self._megatron_forward(input_)
        self.view.check_configs()
        linear = self.linear
        x = input_ if linear.input_is_parallel else scatter_to_tensor_model_parallel_region(input_, group=linear.tp_group)
        partial = F.linear(x, linear.weight)
        partial = partial + self._row_delta(x, active).to(partial.dtype)
        return finish_row_parallel(linear, partial)

    def _row_delta(self, x: torch.Tensor, active) -> torch.Tensor:
        weights = self._weights(active)
        columns = self.parts[0][2].hf_index.to(x.device)
        total = None
        for _, layer, names in active:
            for adapter in names:
                lora_a = weights[id(layer.lora_A[adapter].weight)].index_select(1, columns)
                lora_b = weights[id(layer.lora_B[adapter].weight)]
                dropout = layer.lora_dropout[adapter]
                if _dropout_active(dropout) and _group_size(self.group) > 1:
                    # Each rank holds different input columns: draw from the per-rank stream.
                    with get_cuda_rng_tracker().fork():
                        dropped = dropout(x.to(lora_a.dtype))
                else:
                    dropped = dropout(x.to(lora_a.dtype))
                delta = F.linear(F.linear(dropped, lora_a), lora_b) * layer.scaling[adapter]
                total = delta if total is None else total + delta
        return total

    # ---- merging -------------------------------------------------------------------------------
    @torch.no_grad()
    def add_to_weight(self, projection, delta: torch.Tensor, check_finite: bool = False) -> None:
        """Add this rank's part of an HF-shaped `delta` to the megatron weight (fp32 sum, cast back)."""
        weight = self.linear.weight
        dim = projection.split_dim
        local = projection.local_index.to(weight.device)
        part = delta.to(weight.device).index_select(dim, projection.hf_index.to(weight.device))
        merged = (weight.index_select(dim, local).float() + part.float()).to(weight.dtype)
        if check_finite and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights of {projection.path}: the adapter seems to be broken.")
        weight.index_copy_(dim, local, merged)
