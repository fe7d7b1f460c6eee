"""Build the mcore GPTModel chunks this rank owns, on the meta device (no init, no memory)."""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig

from .architectures import DecoderArchitecture
from .conversion.rules import ShardLayout
from .errors import LayoutError
from .layers import MaskedRowsDotProductAttention
from .runtime.parallel import ParallelConfig


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


@dataclass(frozen=True)
class BuiltModel:
    chunks: list[GPTModel]
    shard_layout: ShardLayout
    uses_transformer_engine: bool


def query_groups_for(num_heads: int, num_kv_heads: int, tp: int) -> int:
    """mcore query groups: the KV heads, replicated up to `tp` when there are fewer KV heads than ranks."""
    if num_heads % tp:
        raise LayoutError(f"tp={tp} does not divide num_attention_heads={num_heads}: choose a tp that divides it.")
    if num_kv_heads >= tp:
        if num_kv_heads % tp:
            raise LayoutError(
                f"tp={tp} does not divide num_key_value_heads={num_kv_heads}: choose a tp that divides it, "
                f"or a multiple of it that divides num_attention_heads={num_heads}."
            )
        return num_kv_heads
    if tp % num_kv_heads:
        raise LayoutError(
            f"tp={tp} is neither a divisor nor a multiple of num_key_value_heads={num_kv_heads}, so KV heads "
            "cannot be split or replicated evenly."
        )
    return tp


def check_model_fits(arch: DecoderArchitecture, layout: ParallelConfig) -> None:
    layers = arch.hf.num_hidden_layers
    stages = layout.pp * layout.virtual_stages
    if layers % stages:
        raise LayoutError(
            f"pp·vpp = {layout.pp}·{layout.virtual_stages} = {stages} does not divide num_hidden_layers={layers}: "
            "choose sizes whose product divides the layer count."
        )
    if layout.cp > 1:
        raise LayoutError("cp > 1 (context parallelism) is not supported yet: it needs Transformer Engine attention.")


def make_transformer_config(arch: DecoderArchitecture, layout: ParallelConfig, dtype: torch.dtype) -> TransformerConfig:
    kwargs = arch.transformer_config()
    kwargs["num_query_groups"] = query_groups_for(
        kwargs["num_attention_heads"], kwargs["num_query_groups"], layout.tp
    )
    return TransformerConfig(
        **kwargs,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.virtual_stages > 1 else None,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp or layout.tp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        attention_softmax_in_fp32=True,
    )


def _layer_spec(config: TransformerConfig, use_te: bool):
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
    # mcore's attention core on both paths (TE linears and fused norms on GPU): it takes our explicit
    # [b, 1, s, s] mask, so padding (left or right) and sliding windows are exact.
    spec.submodules.self_attention.submodules.core_attention = MaskedRowsDotProductAttention
    return spec


@contextlib.contextmanager
def _no_embedding_sync():
    """GPTModel's constructor all-reduces a tied output layer from the first stage (via `.cuda()`).

    Both copies are loaded from the same checkpoint tensor right after construction, so the
    construction-time sync has nothing to do; skipping it lets us build on the meta device and on CPU.
    """
    original = LanguageModule._is_in_embd_group
    LanguageModule._is_in_embd_group = lambda self: False
    try:
        yield
    finally:
        LanguageModule._is_in_embd_group = original


def build_model(arch: DecoderArchitecture, layout: ParallelConfig, dtype: torch.dtype) -> BuiltModel:
    """The GPTModel chunks of this rank (one per virtual stage), parameters on the meta device."""
    check_model_fits(arch, layout)
    config = make_transformer_config(arch, layout, dtype)
    use_te = transformer_engine_available()
    spec = _layer_spec(config, use_te)
    tp, pp_rank, stages = layout.tp, ps.get_pipeline_model_parallel_rank(), layout.virtual_stages
    vocab = arch.hf.vocab_size
    padded_vocab = -(-vocab // tp) * tp
    chunks = []
    with torch.device("meta"), _no_embedding_sync():
        for stage in range(stages):
            chunks.append(
                GPTModel(
                    config=config,
                    transformer_layer_spec=spec,
                    vocab_size=padded_vocab,
                    max_sequence_length=getattr(arch.hf, "max_position_embeddings", 4096),
                    pre_process=pp_rank == 0 and stage == 0,
                    post_process=pp_rank == layout.pp - 1 and stage == stages - 1,
                    share_embeddings_and_output_weights=arch.tie_word_embeddings,
                    position_embedding_type="none",
                    parallel_output=True,
                    vp_stage=stage if stages > 1 else None,
                )
            )
    shard_layout = ShardLayout(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=tp,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        num_query_groups=config.num_query_groups,
        head_dim=config.kv_channels,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab,
    )
    return BuiltModel(chunks, shard_layout, use_te)
