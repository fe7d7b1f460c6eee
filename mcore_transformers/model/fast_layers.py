"""Layer-spec subclasses of megatron-core modules with a lean path for evaluation and generate().

megatron-core's modules are written for training: every linear goes through autograd Functions
(even under `torch.no_grad()`), every layer and attention call walks branches for CUDA graphs,
activation offloading, recompute, cross attention, packed sequences and flash decoding, and the
local attention core repeats KV heads and copies the whole KV cache at every decode step. On CPU,
per decoded token, that Python and copying cost as much as a small model's matmuls.

These subclasses keep megatron's modules, weights and arithmetic (bit-identical results; the attention
core is the exception: it computes what transformers computes, with torch's sdpa) and take a short
path when a module is in eval mode and none of those features is configured:

- `FastColumnParallelLinear` / `FastRowParallelLinear`: without autograd, matmul + the TP
  communication only; at tp=1 (no communication) in training too, differentiated by torch.
- `RotaryCachedSelfAttention`: q/k/v projection, rotary with cos/sin computed once per forward
  for all layers, keys cached *after* rotary (megatron 0.16 caches them before and re-rotates the
  whole cache every step), core attention, output projection.
- `SdpaDotProductAttention`: torch's scaled_dot_product_attention (GQA without repeating heads, fp32
  accumulation, no stored probabilities), masks derived once per forward; in training too.
- `LeanTransformerLayer`: norm → attention → residual → norm → MLP → residual.
  A dense gated MLP runs fc1 → silu(gate) · up → fc2, without megatron's `+ glu_linear_offset` pass
  (an offset of 0 still costs a full pass over the intermediate activations).

In train mode the layer (and linears at tp > 1) run megatron's own code; the attention module's lean
forward, the sdpa core and tp=1 linears serve training too (same arithmetic, differentiable).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor_from_config
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, get_cuda_rng_tracker
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.utils import deprecate_inference_params
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from .layers import MaskedRowsDotProductAttention


class ForwardMemo:
    """Tensors that every layer of one forward derives the same way from the same input tensor.

    The decoder block hands each layer the same mask and rotary-angle tensor objects, so the first
    layer computes what it derives from them (sdpa masks, rotary cos/sin) and the others reuse it.
    An entry is keyed by the source tensor's identity (held, so it cannot be recycled) plus a key;
    `clear()` (end of every model forward) drops them.
    """

    def __init__(self):
        self._entries: dict[str, tuple] = {}

    def get(self, name: str, source: torch.Tensor, key: Any, compute: Callable[[], Any]) -> Any:
        entry = self._entries.get(name)
        if entry is not None and entry[0] is source and entry[1] == key:
            return entry[2]
        value = compute()
        self._entries[name] = (source, key, value)
        return value

    def clear(self) -> None:
        self._entries.clear()


FORWARD_MEMO = ForwardMemo()


# ---- linears -----------------------------------------------------------------------------------

def _tp_size(group) -> int:
    return group.size() if group is not None else 1


class FastColumnParallelLinear(ColumnParallelLinear):
    """megatron's ColumnParallelLinear; without autograd, or at tp=1, its forward runs directly.

    megatron routes every call through three autograd Functions (input copy, linear, output gather;
    plus environment and group look-ups and an autocast decorator) even under `torch.no_grad()`:
    ~60 µs per linear on CPU, and its linear's backward runs in Python. Without autograd those
    Functions are plain communication around megatron's own arithmetic (matmul, then `+ bias`), which
    is what runs here (as `F.linear` without bias: the same product bit for bit, ~15% faster than
    `matmul(x, w.t())` for decode-sized inputs on CPU); at tp=1 there is no communication, so the same matmul is differentiated by
    torch's own autograd (the same products). With autograd at tp > 1 it is megatron's forward.
    """

    def forward(self, input_, weight=None, runtime_gather_output=None):
        parallel = _tp_size(self.tp_group) > 1
        if (torch.is_grad_enabled() and parallel) or self.config._cpu_offloading_context is not None:
            return super().forward(input_, weight, runtime_gather_output)
        if self.sequence_parallel and not self.explicit_expert_comm and parallel:
            input_ = gather_from_sequence_parallel_region(input_, group=self.tp_group)
        weight = self.weight if weight is None else weight  # the LM head may be handed the tied embedding
        output = torch.nn.functional.linear(input_, weight)  # = matmul(x, w.t()) bit for bit, faster on CPU
        if self.bias is not None and not self.skip_bias_add:
            output = output + self.bias
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and parallel:
            output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        return output, self.bias if self.skip_bias_add else None


class FastRowParallelLinear(RowParallelLinear):
    """megatron's RowParallelLinear with the same direct forward as FastColumnParallelLinear.

    At tp=1 this also leaves out megatron's output all-reduce, an identity there that a custom Function
    returns as a view of its input: megatron's MoE expert MLP adds its bias to that output in place,
    which autograd forbids on such a view (GPT-OSS could not train at tp=1).
    """

    def forward(self, input_):
        parallel = _tp_size(self.tp_group) > 1
        if (torch.is_grad_enabled() and parallel) or self.config._cpu_offloading_context is not None:
            return super().forward(input_)
        if not self.input_is_parallel and parallel:
            input_ = scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        return finish_row_parallel(self, torch.nn.functional.linear(input_, self.weight))


def finish_row_parallel(linear: RowParallelLinear, partial: torch.Tensor):
    """(output, bias) of a row-parallel linear from this rank's partial product, as megatron finishes it.

    Summed over TP (reduce-scatter under sequence parallelism; not for experts, whose dispatcher
    communicates, nor at tp=1), then the bias added unless the linear skips it.
    """
    if _tp_size(linear.tp_group) > 1 and not linear.explicit_expert_comm:
        if linear.sequence_parallel:
            partial = reduce_scatter_to_sequence_parallel_region(partial, group=linear.tp_group)
        else:
            partial = reduce_from_tensor_model_parallel_region(partial, group=linear.tp_group)
    if linear.skip_bias_add:
        return partial, linear.bias
    return (partial + linear.bias if linear.bias is not None else partial), None


# ---- rotary ------------------------------------------------------------------------------------

def rotary_cos_sin(angles: torch.Tensor, mscale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of rotary angles as megatron's unfused rotary computes them (`_apply_rotary_pos_emb_bshd`)."""
    return (torch.cos(angles) * mscale).to(dtype), (torch.sin(angles) * mscale).to(dtype)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron's unfused, non-interleaved rotary with precomputed cos / sin: the same arithmetic."""
    rot_dim = cos.shape[-1]
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = torch.chunk(t, 2, dim=-1)
    t = (t * cos) + (torch.cat((-x2, x1), dim=-1) * sin)
    return torch.cat((t, t_pass), dim=-1) if t_pass.shape[-1] else t  # (megatron copies an empty t_pass in)


def _step_cos_sin(angles: torch.Tensor, start: int, end: int, mscale: float, dtype: torch.dtype, table: int = 0):
    return FORWARD_MEMO.get(
        f"rotary{table}", angles, (start, end, mscale, dtype), lambda: rotary_cos_sin(angles[start:end], mscale, dtype)
    )


def layer_angles(angles: torch.Tensor, columns: Optional[tuple[int, int]]) -> torch.Tensor:
    """This layer's rotary angles: the forward's angles hold one block of columns per rotary table (layer types
    with their own rotary settings), `columns` the block of this layer's table (None: one table, all columns). The
    slice is the same tensor object for every layer of that table within one forward, so their cos/sin are computed once."""
    if columns is None:
        return angles
    return FORWARD_MEMO.get(f"rotary_table{columns[0]}", angles, columns, lambda: angles[..., columns[0] : columns[1]])


# ---- attention ---------------------------------------------------------------------------------

class RotaryCachedSelfAttention(SelfAttention):
    """megatron's SelfAttention with keys cached *after* rotary and a lean forward.

    Stock megatron-core 0.16 stores keys before rotary in the static inference context and re-rotates
    every cached key at every decode step, in every layer. Here the new queries and keys are rotated
    once, with their own angles, and the keys are written rotated to the same `key_value_memory_dict`.
    Per element the arithmetic is megatron's, so the results are bit-identical.

    The lean forward (projection, rotary with cos/sin shared by all layers, core, output projection) also
    serves training; it is differentiable like megatron's. Takes megatron's arguments: one angles tensor
    for all `offset + s` positions (the new tokens use `[offset : offset + s]`). With flash decoding,
    fused or interleaved rotary, context parallelism, packed sequences, output gates, skipped rotary
    layers, offloading or recomputed core attention, it is megatron's forward.

    `rotary_columns` (set by the builder where layer types have their own rotary tables): the block of the
    angles' last dimension that holds this layer's table; both paths see only that block.
    """

    rotary_columns: Optional[tuple[int, int]] = None

    def _lean(self, inference_context, key_value_states, packed_seq_params) -> bool:
        config = self.config
        return not (
            # recomputed core attention (train mode) is megatron's; with a KV cache it is always lean, so
            # every step caches keys the same way (rotated)
            (self.training and self.checkpoint_core_attention and inference_context is None)
            or key_value_states is not None
            or packed_seq_params is not None
            or (inference_context is not None and not inference_context.is_static_batching())
            or config.flash_decode
            or config.apply_rope_fusion
            or config.rotary_interleaved
            or config.attention_output_gate
            or config.no_rope_freq
            or config.fused_single_qkv_rope
            or self.pg_collection.cp.size() > 1
            or self.offload_qkv_linear
            or self.offload_attn_proj
        )

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *, inference_params=None):
        inference_context = deprecate_inference_params(inference_context, inference_params)
        if isinstance(rotary_pos_emb, torch.Tensor):
            rotary_pos_emb = layer_angles(rotary_pos_emb, self.rotary_columns)
        if not self._lean(inference_context, key_value_states, packed_seq_params):
            return super().forward(
                hidden_states, attention_mask, key_value_states, inference_context, rotary_pos_emb, rotary_pos_cos,
                rotary_pos_sin, rotary_pos_cos_sin, attention_bias, packed_seq_params, sequence_len_offset,
            )
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        if rotary_pos_emb is not None:
            angles = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            start = inference_context.sequence_len_offset if inference_context is not None else 0
            mscale = _yarn_get_concentration_factor_from_config(self.config)
            table = self.rotary_columns[0] if self.rotary_columns is not None else 0
            cos, sin = _step_cos_sin(angles, start, start + key.size(0), mscale, query.dtype, table)
            query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        attn_mask_type = self.attn_mask_type
        if inference_context is not None:
            query, key, value, _, attn_mask_type, _ = self._adjust_key_value_for_inference(
                inference_context, query, key, value, None
            )
        context = self.core_attention(
            query, key, value, attention_mask, attn_mask_type=attn_mask_type, attention_bias=attention_bias,
            packed_seq_params=None,
        )
        return self.linear_proj(context)


class SdpaDotProductAttention(MaskedRowsDotProductAttention):
    """Our attention core, computed by torch's scaled_dot_product_attention (inference and training).

    mcore's local core repeats the KV heads for GQA, materialises the scores and probabilities of every
    head ([b·heads, s, s], copied several times, in fp32 for the softmax) and, at decode, copies the
    whole KV cache four times per layer and step. torch's sdpa (the kernel transformers uses, forward
    and backward) handles GQA itself, accumulates in fp32 and never stores the probabilities: on CPU
    about half the attention time in training and several times less at decode. A query row with no
    visible key gives zeros (and zero gradients), as in the parent class. Attention dropout draws from
    megatron's model-parallel RNG stream, like megatron's core. Attention sinks, attention biases and
    packed sequences use megatron's core.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if (
            attention_mask is None
            or attention_bias is not None
            or packed_seq_params is not None
            or self.softmax_offset is not None  # attention sinks: megatron's softmax
            or self.config.apply_query_key_layer_scaling
        ):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        allowed, blind = FORWARD_MEMO.get(
            "sdpa_masks", attention_mask, self.window, lambda: self._sdpa_masks(attention_mask)
        )
        # [s, b, heads, d] -> [b, heads, s, d]. The keys and values are copied into that layout: sdpa's CPU
        # kernel reads them ~2x slower through the cache's strides than the copy costs.
        q = query.permute(1, 2, 0, 3)
        k, v = (t.permute(1, 2, 0, 3).contiguous() for t in (key, value))
        dropout = self.config.attention_dropout if self.training else 0.0
        with get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            context = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout, scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        context = context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
        return context if blind is None else context.masked_fill(blind, 0.0)

    def _sdpa_masks(self, attention_mask: torch.Tensor):
        """(sdpa's mask, True = attend, or None when nothing is hidden; rows to zero [s, b, 1], or None).

        On CPU a decode step with no padding attends everywhere: sdpa then runs without a mask, as
        transformers' does (on GPU the check would stall the stream, so the mask is always passed).
        """
        hidden = self.with_window(attention_mask)
        blind = hidden.all(dim=-1).permute(2, 0, 1)  # [s, b, 1]: rows with no visible key
        allowed = ~hidden
        if hidden.device.type == "cpu":
            allowed = allowed if hidden.any() else None
            blind = blind if blind.any() else None
        return allowed, blind


# ---- MLP ---------------------------------------------------------------------------------------

def _lean_gated_mlp(mlp: torch.nn.Module, hidden_states: torch.Tensor):
    """megatron's dense gated MLP without its `x_linear + glu_linear_offset` pass, or None if it does not apply.

    Same arithmetic: fc1 (+ bias), `activation(gate) * up`, fc2 (an offset of 0 still costs megatron a
    full pass over the intermediate activations). Fused or TE activations, clamps and offsets: None.
    """
    config = mlp.config
    if (
        type(mlp) is not MLP
        or not config.gated_linear_unit
        or config.use_te_activation_func
        or config.bias_activation_fusion
        or config.activation_func_clamp_value is not None
        or config.glu_linear_offset != 0
    ):
        return None
    intermediate, bias = mlp.linear_fc1(hidden_states)
    if bias is not None:
        intermediate = intermediate + bias
    gate, up = torch.chunk(intermediate, 2, dim=-1)
    return mlp.linear_fc2(config.activation_func(gate) * up)


# ---- layer -------------------------------------------------------------------------------------

class LeanTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer; in eval mode: norm → attention → residual → norm → MLP → residual.

    (A dense gated MLP is computed by `_lean_gated_mlp` from the MLP's own linears.)

    Skips the per-call branches for recompute, offloading, cross attention, fused TP inference
    kernels, chunked MLP prefill and CUDA graphs, none of which is configured when it applies. The
    bias-dropout-add of eval mode is megatron's arithmetic: `x (+ bias) + residual`, in place when
    nothing needs a gradient.
    """

    def _lean(self) -> bool:
        config = self.config
        return not (
            self.training
            or self.recompute_input_layernorm
            or self.recompute_pre_mlp_layernorm
            or self.recompute_mlp
            or self.offload_attn_norm
            or self.offload_mlp_norm
            or config.inference_fuse_tp_communication
            or config.mlp_chunks_for_prefill > 1
            or not isinstance(self.cross_attention, IdentityOp)
        )

    def forward(self, *args, **kwargs):
        if args or not self._lean():
            return super().forward(*args, **kwargs)
        hidden_states = kwargs["hidden_states"]
        attention_output = self.self_attention(
            self.input_layernorm(hidden_states),
            attention_mask=kwargs.get("attention_mask"),
            inference_context=kwargs.get("inference_context"),
            rotary_pos_emb=kwargs.get("rotary_pos_emb"),
            rotary_pos_cos=kwargs.get("rotary_pos_cos"),
            rotary_pos_sin=kwargs.get("rotary_pos_sin"),
            rotary_pos_cos_sin=kwargs.get("rotary_pos_cos_sin"),
            attention_bias=kwargs.get("attention_bias"),
            packed_seq_params=kwargs.get("packed_seq_params"),
            sequence_len_offset=kwargs.get("sequence_len_offset"),
        )
        hidden_states = _add_residual(attention_output, hidden_states, getattr(self.self_attn_bda, "output_scale", None))
        mlp_input = self.pre_mlp_layernorm(hidden_states)
        mlp_output = _lean_gated_mlp(self.mlp, mlp_input)
        if mlp_output is None:
            mlp_output = self.mlp(mlp_input, padding_mask=kwargs.get("padding_mask"))
        return _add_residual(mlp_output, hidden_states, getattr(self.mlp_bda, "output_scale", None)), kwargs.get("context")


def _add_residual(output_with_bias, residual: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """megatron's bias-dropout-add in eval mode (`_bias_dropout_add_func`, training=False); with `scale`, the
    sublayer output times it first (`layers.scaled_bias_dropout_add`)."""
    x, bias = output_with_bias
    inplace = not (x.requires_grad or residual.requires_grad or (bias is not None and bias.requires_grad))
    residual = residual if residual.dtype == x.dtype else residual.to(x.dtype)
    if bias is not None:
        x = x.add_(bias) if inplace else x + bias
    if scale is not None:
        x = x.mul_(scale) if inplace else x * scale
    return x.add_(residual) if inplace else residual + x
