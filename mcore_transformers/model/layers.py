"""Layer-spec modules we supply to megatron-core (subclasses, not patches)."""

from __future__ import annotations

import torch
import torch.distributed.nn as dist_nn
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.multi_latent_attention import MLASelfAttention


class MaskedRowsDotProductAttention(DotProductAttention):
    """mcore's attention core, with HF's answer for a query that may attend to no key: a zero output.

    mcore fills masked scores with -10000, so a fully masked row (a left-padding query) averages every
    value; torch's sdpa, and so transformers, return zeros there. Padding positions feed later layers
    only through masked keys, but their own logits reach the loss when the next label is real.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # On a sliding-window layer megatron's softmax replaces the mask it is given by a causal window
        # mask of its own (padding lost); keep the window here and add it to our mask instead.
        self.window = self.scale_mask_softmax.window_size
        self.scale_mask_softmax.window_size = None

    def with_window(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask plus this layer's sliding window (True = hidden), if it has one."""
        if self.window is None or attention_mask is None:
            return attention_mask
        queries, keys = attention_mask.shape[-2:]  # the queries are the last positions of the keys
        position = torch.arange(keys, device=attention_mask.device)
        distance = position[keys - queries :, None] - position[None, :]
        return attention_mask | (distance > self.window[0])  # window = (left, right) like TE

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        attention_mask = self.with_window(attention_mask)
        context = super().forward(query, key, value, attention_mask, *args, **kwargs)
        if attention_mask is None:
            return context
        blind = attention_mask.all(dim=-1)  # [b, 1, s]: rows with no visible key
        return context.masked_fill(blind.permute(2, 0, 1), 0.0)  # context is [s, b, h]


class SoftcappedDotProductAttention(MaskedRowsDotProductAttention):
    """The attention core with the scores soft-capped, `cap · tanh(scores / cap)`, before the mask and softmax (Gemma 2's
    `attn_logit_softcapping`), computed as transformers' eager attention computes it: scaled q·k per head (KV heads
    repeated), the cap, masked scores at the dtype's minimum, softmax in float32 cast back, then the values. torch's
    sdpa has no cap, megatron's core neither. Eager attention is what transformers runs for soft-capped scores, so a
    query with no visible key (left padding) averages every value as it does there, not zeros as the parent class:
    such a position's logits reach the loss when the next label is real."""

    def __init__(self, *args, softcap: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.softcap = softcap

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None or self.softmax_offset is not None:
            raise NotImplementedError("soft-capped attention takes no attention bias, packed sequences or sinks.")
        if attention_mask is None:  # megatron's causal default: the queries are the last positions of the keys
            queries, keys = query.shape[0], key.shape[0]
            attention_mask = torch.ones(queries, keys, dtype=torch.bool, device=query.device).triu(keys - queries + 1)
            attention_mask = attention_mask[None, None]
        hidden = self.with_window(attention_mask)
        # [s, b, heads, d] -> [b, heads, s, d]; KV heads repeated for their query heads, as transformers' repeat_kv
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        repeats = q.shape[1] // k.shape[1]
        if repeats > 1:
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.softmax_scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        dropout = self.config.attention_dropout if self.training else 0.0
        if dropout > 0:
            with get_cuda_rng_tracker().fork():
                probs = torch.nn.functional.dropout(probs, p=dropout)
        context = torch.matmul(probs, v)  # [b, heads, s, d]
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


class LatentDotProductAttention(MaskedRowsDotProductAttention):
    """The same core for multi-latent attention, whose keys and values have different head sizes.

    megatron's MLA builds its core with `k_channels` / `v_channels` (TE's attention takes them; the
    local DotProductAttention of megatron-core 0.16 does not). The score scale comes from MLA
    (`softmax_scale`); only the output width depends on the value head size.
    """

    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        super().__init__(*args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition


class MLASelfAttentionOwnRotary(MLASelfAttention):
    """megatron's MLA, which applies its own rotary (YaRN included): the block's rotary angles are dropped."""

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


class _ProjectionRMSNorm(torch.nn.Module):
    """RMSNorm over a whole q or k projection (every head at once), as OLMo/OLMoE apply it before rotary.

    megatron's q/k norms act per head. This one takes the same [s, b, heads, head_dim] input but
    normalises each token over all heads; under TP each rank holds its heads' slice of the weight
    and the sum of squares is all-reduced over the TP group. Computed in float32 like transformers.
    """

    def __init__(self, heads: int, hidden_size: int, config, eps: float = 1e-6):
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.eps = eps
        self.full_size = heads * hidden_size
        self.weight = torch.nn.Parameter(torch.ones(heads // tp * hidden_size, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(*shape[:-2], -1).float()
        square_sum = x.pow(2).sum(-1, keepdim=True)
        group = parallel_state.get_tensor_model_parallel_group()
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            square_sum = dist_nn.all_reduce(square_sum, group=group)  # autograd-aware sum over TP
        x = x * torch.rsqrt(square_sum / self.full_size + self.eps)
        if self.weight_in_float32:
            return (self.weight * x).to(dtype).reshape(shape)
        return (self.weight * x.to(dtype)).reshape(shape)

    weight_in_float32 = False  # OLMo2: (weight * x).to(dtype), as TransformersRMSNormWeightInFloat32


class QueryProjectionRMSNorm(_ProjectionRMSNorm):
    def __init__(self, hidden_size: int, config, eps: float = 1e-6):
        super().__init__(config.num_attention_heads, hidden_size, config, eps)


class KeyProjectionRMSNorm(_ProjectionRMSNorm):
    def __init__(self, hidden_size: int, config, eps: float = 1e-6):
        super().__init__(config.num_query_groups, hidden_size, config, eps)


class QueryProjectionRMSNormWeightInFloat32(QueryProjectionRMSNorm):
    weight_in_float32 = True


class KeyProjectionRMSNormWeightInFloat32(KeyProjectionRMSNorm):
    weight_in_float32 = True


class TransformersRMSNorm(torch.nn.Module):
    """RMSNorm with transformers' arithmetic, for megatron's norm slots on the local (non-TE) path.

    transformers normalises in float32, casts back to the input dtype, then multiplies by the weight.
    torch's fused RMSNorm (megatron's WrappedTorchNorm) multiplies before casting: one rounding apart
    in bf16 from every HF model, and on CPU ~2x slower on long inputs. megatron's torch norms also
    refuse sequence parallelism outright; a norm acts on each token alone, so a sequence shard changes
    nothing in the forward. The weight is marked `sequence_parallel` as megatron marks its own norms,
    so gradient reduction sums it over the TP group.
    """

    weight_in_float32 = False  # GPT-OSS: (weight * x).to(dtype) instead of weight * x.to(dtype)
    unit_offset = False  # Gemma: (x * (1 + weight.float())).to(dtype)

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        if self.weight_in_float32:
            return (self.weight * x).to(dtype)
        return self.weight * x.to(dtype)


class TransformersLayerNorm(torch.nn.Module):
    """LayerNorm with a bias, as torch's `nn.LayerNorm` computes it (PhiMoE), for megatron's norm slots on the local
    path; weight and bias marked `sequence_parallel` like `TransformersRMSNorm`'s weight."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for parameter in (self.weight, self.bias):
            setattr(parameter, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class TransformersRMSNormWeightInFloat32(TransformersRMSNorm):
    weight_in_float32 = True


class TransformersRMSNormUnitOffset(TransformersRMSNorm):
    """Gemma's RMSNorm: scaled by (1 + weight) in float32. The parameter is the checkpoint's weight as it is (zeros: the
    identity), so it loads and exports unchanged; megatron's name for this norm is `layernorm_zero_centered_gamma`."""

    unit_offset = True


def with_post_norm(linear_class: type, norm_class: type) -> type:
    """`linear_class` (a row-parallel linear: attention's linear_proj, the MLP's linear_fc2) whose output, bias
    added, goes through an RMSNorm (`post_norm`) before the residual add: GLM-4 normalises each sublayer's output
    (`post_self_attn_layernorm`, `post_mlp_layernorm`). The norm acts on each token, so a sequence-parallel shard of
    the output is normalised as it is. The norm runs as a forward hook, so whatever computes the linear's output
    (its own forward, or a LoRA host that replaces it) is normalised."""

    class PostNormed(linear_class):
        def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.post_norm = norm_class(config, output_size, eps=config.layernorm_epsilon)
            self.register_forward_hook(_normalise_output)

    PostNormed.__name__ = PostNormed.__qualname__ = f"PostNormed{linear_class.__name__}"
    return PostNormed


def with_bias(linear_class: type) -> type:
    """`linear_class` built with a bias whatever the config's `add_bias_linear` says: PhiMoE's o_proj has a bias while
    its experts have none, and megatron builds attention's linear_proj and the MLP's linears from that one switch. A
    row-parallel bias is whole on every rank, added after the reduce (megatron's RowParallelLinear)."""

    class Biased(linear_class):
        def __init__(self, input_size: int, output_size: int, **kwargs):
            super().__init__(input_size, output_size, **{**kwargs, "bias": True})

    Biased.__name__ = Biased.__qualname__ = f"Biased{linear_class.__name__}"
    return Biased


def _normalise_output(linear, args, result):
    output, bias = result
    if bias is not None:
        output = output + bias
    return linear.post_norm(output), None


def with_epsilon(norm_class: type, eps: float) -> type:
    """`norm_class` built with `eps` whatever epsilon megatron passes it: transformers' DeepSeek-style MLA builds its
    q/kv latent norms with RMSNorm's default epsilon, not the config's `rms_norm_eps` that megatron gives every norm."""

    class FixedEpsilon(norm_class):
        def __init__(self, config, hidden_size: int, **kwargs):
            super().__init__(config, hidden_size, **{**kwargs, "eps": eps})

    FixedEpsilon.__name__ = FixedEpsilon.__qualname__ = f"FixedEpsilon{norm_class.__name__}"
    return FixedEpsilon


def scaled_bias_dropout_add(multiplier: float):
    """megatron's bias-dropout-add (`get_bias_dropout_add`'s unfused arithmetic) with the sublayer's output, bias
    included, times `multiplier` before the residual add: `residual + dropout((x + bias) · multiplier)` (Granite's
    `residual_multiplier`; transformers multiplies by the Python float, so does this). The lean layer reads
    `output_scale` to do the same in its eval path."""

    def get(training: bool, fused: bool):
        def bias_dropout_add(x_with_bias, residual: torch.Tensor, prob: float) -> torch.Tensor:
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            residual = residual if residual.dtype == x.dtype else residual.to(x.dtype)
            return residual + torch.nn.functional.dropout(x * multiplier, p=prob, training=training)

        return bias_dropout_add

    get.output_scale = multiplier
    return get
