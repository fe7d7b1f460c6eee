"""Build the mcore GPTModel chunks this rank owns, on the meta device (no init, no memory)."""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.transformer_block import (
    LayerNormImpl,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import MLATransformerConfig

from ..architectures import DecoderArchitecture
from ..conversion.rules import ShardLayout
from ..errors import LayoutError, UnsupportedModelError
from .fast_layers import (
    FastColumnParallelLinear,
    FastRowParallelLinear,
    LeanTransformerLayer,
    RotaryCachedSelfAttention,
    SdpaDotProductAttention,
)
from .layers import (
    KeyProjectionRMSNorm,
    KeyProjectionRMSNormWeightInFloat32,
    LatentDotProductAttention,
    MLASelfAttentionOwnRotary,
    QueryProjectionRMSNorm,
    QueryProjectionRMSNormWeightInFloat32,
    SoftcappedDotProductAttention,
    TransformersLayerNorm,
    TransformersRMSNorm,
    TransformersRMSNormUnitOffset,
    TransformersRMSNormWeightInFloat32,
    scaled_bias_dropout_add,
    with_bias,
    with_epsilon,
    with_post_norm,
)
from .padding_row import freeze_pad_row_lookups
from .routers import router_for
from .stream_ends import add_output_bias, divide_logits, scale_embedding_output, softcap_logits
from ..runtime.cpu import bridge_missing_transformer_engine
from ..runtime.parallel import ParallelConfig


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


@dataclass(frozen=True)
class BuiltModel:
    chunks: list[GPTModel]
    shard_layout: ShardLayout
    uses_transformer_engine: bool


def query_groups_for(num_heads: int, num_kv_heads: int, tp: int) -> int:
    """mcore query groups: the KV heads when tp divides them; otherwise each KV head repeated into the fewest
    copies that make a group count tp divides (which the query heads divide too). Export folds the copies back
    (`FusedQKV`), training keeps them equal (training/kv_copies.py)."""
    if num_heads % tp:
        raise LayoutError(f"tp={tp} does not divide num_attention_heads={num_heads}: choose a tp that divides it.")
    return math.lcm(num_kv_heads, tp)  # divides num_heads: tp and the KV heads both do


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
    check_experts_fit(arch.transformer_config(), layout)


def check_experts_fit(kwargs: dict, layout: ParallelConfig) -> None:
    """Expert, MLA and shared-expert sizes that the layout must divide, named with both numbers."""
    experts = kwargs.get("num_moe_experts")
    etp = layout.etp or layout.tp
    if not experts:
        if layout.ep > 1 or (layout.etp or 1) > 1:
            raise LayoutError(f"ep={layout.ep}, etp={layout.etp}: this model has no experts; use ep=1 and no etp.")
    else:
        if experts % layout.ep:
            raise LayoutError(
                f"ep={layout.ep} does not divide the {experts} routed experts: each expert-parallel rank must hold "
                "the same number of experts. Choose an ep that divides it."
            )
        if kwargs["moe_ffn_hidden_size"] % etp:
            raise LayoutError(
                f"etp={etp} does not divide the experts' intermediate size {kwargs['moe_ffn_hidden_size']}."
            )
        if kwargs.get("add_bias_linear") and etp > 1:
            raise LayoutError(
                f"etp={etp}: megatron-core 0.16 supports expert biases only with whole experts per rank. "
                "Pass etp=1 (experts then spread over ep and replicated over tp)."
            )
        shared = kwargs.get("moe_shared_expert_intermediate_size")
        if shared and shared % layout.tp:
            raise LayoutError(f"tp={layout.tp} does not divide the shared experts' intermediate size {shared}.")
    if kwargs.get("multi_latent_attention"):
        widths = {"kv_lora_rank + qk_rope_head_dim": kwargs["kv_lora_rank"] + kwargs["qk_pos_emb_head_dim"]}
        if kwargs["q_lora_rank"] is not None:
            widths["q_lora_rank"] = kwargs["q_lora_rank"]
        for name, width in widths.items():
            if width % layout.tp:  # the latent down-projections are split over TP
                raise LayoutError(f"tp={layout.tp} does not divide the MLA down-projection width {name} = {width}.")


def make_transformer_config(arch: DecoderArchitecture, layout: ParallelConfig, dtype: torch.dtype) -> TransformerConfig:
    kwargs = arch.transformer_config()
    kwargs["num_query_groups"] = query_groups_for(
        kwargs["num_attention_heads"], kwargs["num_query_groups"], layout.tp
    )
    if arch.qk_norm_over_heads() and kwargs["num_query_groups"] != arch.num_key_value_heads:
        raise LayoutError(
            f"tp={layout.tp} exceeds num_key_value_heads={arch.num_key_value_heads}: a k norm over all heads cannot "
            "be split over replicated KV heads. Choose tp <= num_key_value_heads."
        )
    if kwargs.get("num_moe_experts"):
        # Transformer Engine: grouped GEMM experts and all-to-all dispatch. Without it (CPU): one
        # MLP per expert (SequentialMLP) and all-gather dispatch, which needs no CUDA streams.
        use_te = transformer_engine_available()
        kwargs.update(
            moe_grouped_gemm=use_te,
            moe_token_dispatcher_type="alltoall" if use_te else "allgather",
            moe_permute_fusion=False,
            moe_router_fusion=False,
        )
    config_class = MLATransformerConfig if kwargs.get("multi_latent_attention") else TransformerConfig
    return config_class(
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
    _use_cached_rotary_attention(spec.submodules.self_attention)
    _use_lean_modules(spec, use_te)
    return spec


def _use_lean_modules(spec: ModuleSpec, use_te: bool) -> None:
    """The fast_layers subclasses: megatron's modules with a lean path in eval mode (same arithmetic)."""
    if spec.module is TransformerLayer:
        spec.module = LeanTransformerLayer
    if use_te:
        return
    # MLA's attention accepts only megatron's own linear classes (identity checks): its linears stay.
    attention = spec.submodules.self_attention
    for part in (spec.submodules.mlp, attention if attention.module is RotaryCachedSelfAttention else None):
        if part is not None:
            _replace_module(part, ColumnParallelLinear, FastColumnParallelLinear)
            _replace_module(part, RowParallelLinear, FastRowParallelLinear)


def _use_cached_rotary_attention(attention: ModuleSpec) -> None:
    # Our attention core on both paths (TE linears and fused norms on GPU): it takes our explicit
    # [b, 1, s, s] mask, so padding (left or right) and sliding windows are exact; at inference it runs
    # torch's sdpa. Keys enter the KV cache already rotated (see fast_layers.py).
    attention.module = RotaryCachedSelfAttention
    attention.submodules.core_attention = SdpaDotProductAttention


def _block_spec(config: TransformerConfig, use_te: bool, arch: DecoderArchitecture, pp_rank: int, vp_stage):
    """The layer specs of one chunk: one spec for every layer of a plain GQA decoder, else per layer."""
    plain = (
        not config.num_moe_experts and not config.multi_latent_attention and not arch.qk_norm_over_heads()
        and arch.pre_sublayer_norms()
    )
    norm = _norm_class(arch)
    if plain and use_te:
        spec = _layer_spec(config, use_te)  # (TE's fused norms: nothing to swap; they read layernorm_zero_centered_gamma)
        _add_post_norms([spec], arch, norm)
        _softcap_attention([spec], arch)
        _scale_sublayer_outputs([spec], arch)
        _bias_on_attention_output([spec], arch)
        return spec
    if plain:
        layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        block = TransformerBlockSubmodules(layer_specs=[_layer_spec(config, use_te)] * layers, layer_norm=LayerNormImpl)
    else:
        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
        )
        for spec in {id(spec): spec for spec in block.layer_specs}.values():
            _customise_attention(spec.submodules.self_attention, config, use_te, arch)
            _use_lean_modules(spec, use_te)
    if not use_te:
        # transformers' RMSNorm arithmetic for every norm (megatron's torch norms round differently and
        # refuse sequence parallelism).
        block.layer_norm = norm
        for spec in {id(spec): spec for spec in block.layer_specs}.values():
            for megatron_norm in {WrappedTorchNorm, LayerNormImpl}:
                _replace_module(spec, megatron_norm, norm)
    if not arch.pre_sublayer_norms():
        _drop_pre_norms(block.layer_specs, use_te)
    _add_post_norms(block.layer_specs, arch, norm)
    _softcap_attention(block.layer_specs, arch)
    _scale_sublayer_outputs(block.layer_specs, arch)
    _bias_on_attention_output(block.layer_specs, arch)
    _choose_router(block.layer_specs, config, arch)
    _latent_norms_with_own_eps(block.layer_specs, config, arch, norm, use_te)
    return block


def _norm_class(arch: DecoderArchitecture) -> type:
    """transformers' norm arithmetic of the family: LayerNorm with a bias, or RMSNorm with (1 + weight) in float32,
    weight in float32, or Llama's."""
    if arch.layer_norm_with_bias():
        return TransformersLayerNorm
    if arch.rms_norm_unit_offset():
        return TransformersRMSNormUnitOffset
    return TransformersRMSNormWeightInFloat32 if arch.rms_norm_weight_in_float32() else TransformersRMSNorm


def _softcap_attention(specs, arch: DecoderArchitecture) -> None:
    """Families that soft-cap the attention scores (Gemma 2): the eager core with the cap (torch's sdpa has none)."""
    cap = arch.attention_logit_softcap()
    if cap is None:
        return
    for spec in {id(spec): spec for spec in specs}.values():
        attention = spec.submodules.self_attention
        if attention.module is not RotaryCachedSelfAttention:
            raise UnsupportedModelError("Attention logit soft-capping is supported on grouped-query attention only.")
        attention.submodules.core_attention = ModuleSpec(module=SoftcappedDotProductAttention, params={"softcap": cap})


def _scale_sublayer_outputs(specs, arch: DecoderArchitecture) -> None:
    """Families that scale each sublayer's output before its residual add (Granite's `residual_multiplier`): both
    bias-dropout-adds of every layer scale it (`layers.scaled_bias_dropout_add`)."""
    multiplier = arch.residual_multiplier()
    if multiplier is None:
        return
    for spec in {id(spec): spec for spec in specs}.values():
        spec.submodules.self_attn_bda = spec.submodules.mlp_bda = scaled_bias_dropout_add(multiplier)


def _bias_on_attention_output(specs, arch: DecoderArchitecture) -> None:
    """Families with a bias on o_proj but none on the MLP (PhiMoE): attention's linear_proj built with one."""
    if not arch.attention_output_bias():
        return
    for spec in {id(spec): spec for spec in specs}.values():
        attention = spec.submodules.self_attention.submodules
        attention.linear_proj = with_bias(attention.linear_proj)


def _assign_rotary_tables(chunks, arch: DecoderArchitecture) -> None:
    """Layer types with their own rotary settings: the forward's angles hold one block of columns per rotary table
    (`MCoreModelForCausalLM.rotary_angles_for`); each attention layer is told which block is its table's."""
    tables, table_of_layer = arch.rotary_tables()
    if table_of_layer is None:
        return
    bounds = [0]
    for table in tables:  # each frequency rotates two elements of the head
        bounds.append(bounds[-1] + 2 * table.numel())
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            attention = layer.self_attention
            if not isinstance(attention, RotaryCachedSelfAttention):
                raise UnsupportedModelError(
                    f"{type(attention).__name__} with rotary settings per layer type: only grouped-query attention "
                    "layers take one rotary table per layer type."
                )
            table = table_of_layer[layer.layer_number - 1]
            attention.rotary_columns = (bounds[table], bounds[table + 1])


def _drop_pre_norms(specs, use_te: bool) -> None:
    """Families that normalise only each sublayer's output (OLMo2): no norm before attention and the MLP. Under
    Transformer Engine the norm is fused into the next linear, so that linear becomes TE's plain one."""
    for spec in {id(spec): spec for spec in specs}.values():
        layer = spec.submodules
        layer.input_layernorm = IdentityOp
        layer.pre_mlp_layernorm = IdentityOp
        if use_te:
            from megatron.core.extensions.transformer_engine import (
                TEColumnParallelLinear, TELayerNormColumnParallelLinear,
            )

            _replace_module(spec, TELayerNormColumnParallelLinear, TEColumnParallelLinear)


def _add_post_norms(specs, arch: DecoderArchitecture, norm: type) -> None:
    """Families that normalise each sublayer's output (GLM-4): attention's linear_proj and the dense MLP's
    linear_fc2 end in an RMSNorm (`layers.with_post_norm`)."""
    if not arch.post_sublayer_norms():
        return
    for spec in {id(spec): spec for spec in specs}.values():
        attention, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
        if not hasattr(mlp, "linear_fc2"):
            raise UnsupportedModelError("Post-sublayer norms on a mixture-of-experts layer are not supported.")
        attention.linear_proj = with_post_norm(attention.linear_proj, norm)
        mlp.linear_fc2 = with_post_norm(mlp.linear_fc2, norm)


def _choose_router(specs, config: TransformerConfig, arch: DecoderArchitecture) -> None:
    """The router the architecture's switches ask for (`routers.router_for`) in place of megatron's TopKRouter."""
    router = router_for(arch, config)
    if router is not None:
        for spec in {id(spec): spec for spec in specs}.values():
            _replace_module(spec, TopKRouter, router)


def _latent_norms_with_own_eps(specs, config: TransformerConfig, arch: DecoderArchitecture, norm: type, use_te: bool):
    """MLA's q/kv latent norms with the epsilon transformers gives them (`mla_latent_norm_eps`) where it is not the
    other norms' (megatron builds every norm with layernorm_epsilon). Transformer Engine fuses these norms into the
    up-projections with the config's epsilon: there the norm becomes a module of its own before a plain linear."""
    eps = arch.mla_latent_norm_eps()
    if not config.multi_latent_attention or eps is None or eps == config.layernorm_epsilon:
        return
    latent_norm = with_epsilon(norm, eps)
    for spec in {id(spec): spec for spec in specs}.values():
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.kv_layernorm = latent_norm
        if use_te:
            from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

            attention.linear_q_up_proj = attention.linear_kv_up_proj = TEColumnParallelLinear


def _customise_attention(attention: ModuleSpec, config: TransformerConfig, use_te: bool, arch: DecoderArchitecture):
    if config.multi_latent_attention:
        attention.module = MLASelfAttentionOwnRotary
        attention.submodules.core_attention = LatentDotProductAttention
        if use_te:
            # The local spec shards the latent down-projections over TP (ColumnParallelLinear);
            # TE's default replicates them. Shard them on both paths so one rule set covers both.
            from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

            attention.submodules.linear_q_down_proj = TEColumnParallelLinear
            attention.submodules.linear_kv_down_proj = TEColumnParallelLinear
    else:
        _use_cached_rotary_attention(attention)
    if arch.qk_norm_over_heads():
        in_float32 = arch.rms_norm_weight_in_float32()
        attention.submodules.q_layernorm = QueryProjectionRMSNormWeightInFloat32 if in_float32 else QueryProjectionRMSNorm
        attention.submodules.k_layernorm = KeyProjectionRMSNormWeightInFloat32 if in_float32 else KeyProjectionRMSNorm


def _replace_module(spec, old: type, new: type) -> None:
    """Swap every use of module class `old` in a spec tree (ModuleSpecs and their submodule dataclasses)."""
    holder = spec.submodules if isinstance(spec, ModuleSpec) else spec
    if holder is None or not hasattr(holder, "__dataclass_fields__"):
        return
    for name in holder.__dataclass_fields__:
        value = getattr(holder, name)
        if value is old:
            setattr(holder, name, new)
        elif isinstance(value, ModuleSpec) and value.module is old:
            value.module = new
        elif isinstance(value, ModuleSpec) or hasattr(value, "__dataclass_fields__"):
            _replace_module(value, old, new)


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


def mark_tensor_parallel_weights(chunks) -> None:
    """Set mcore's `tensor_model_parallel` / `partition_dim` flags on sharded weights that lack them.

    mcore sets them on a linear's weight only while initialising it (`_initialize_affine_weight_*`,
    tensor_parallel/layers.py); a model built with `perform_initialization=False` and loaded from a
    checkpoint has them on biases only. The gradient norm needs them to count each shard once.
    """
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding, set_tensor_model_parallel_attributes

    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
                dim = 0
            elif isinstance(module, RowParallelLinear):
                dim = 1
            elif getattr(module, "parallel_mode", None) in ("column", "row"):  # Transformer Engine linears
                dim = 0 if module.parallel_mode == "column" else 1
            else:
                continue
            for name, param in module.named_parameters(recurse=False):
                if name.startswith("weight") and param.dim() == 2 and not hasattr(param, "tensor_model_parallel"):
                    set_tensor_model_parallel_attributes(param, True, dim, 1)


def build_model(arch: DecoderArchitecture, layout: ParallelConfig, dtype: torch.dtype) -> BuiltModel:
    """The GPTModel chunks of this rank (one per virtual stage), parameters on the meta device."""
    check_model_fits(arch, layout)
    config = make_transformer_config(arch, layout, dtype)
    use_te = transformer_engine_available()
    if not use_te:
        bridge_missing_transformer_engine()  # also on a GPU without TE (megatron-core 0.16 MLA import)
    tp, pp_rank, stages = layout.tp, ps.get_pipeline_model_parallel_rank(), layout.virtual_stages
    vocab = arch.hf.vocab_size
    padded_vocab = -(-vocab // tp) * tp
    chunks = []
    with torch.device("meta"), _no_embedding_sync():
        for stage in range(stages):
            chunks.append(
                GPTModel(
                    config=config,
                    transformer_layer_spec=_block_spec(
                        config, use_te, arch, pp_rank, stage if stages > 1 else None
                    ),
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
    for chunk in chunks:
        if chunk.post_process and type(chunk.output_layer) is ColumnParallelLinear:
            # GPTModel builds its LM head as megatron's ColumnParallelLinear (not from the layer spec): the lean
            # subclass computes the same logits faster (its forward is the only difference).
            chunk.output_layer.__class__ = FastColumnParallelLinear
    if arch.lm_head_bias():
        add_output_bias(chunks)
    mark_tensor_parallel_weights(chunks)
    freeze_pad_row_lookups(chunks, getattr(arch.hf, "pad_token_id", None), vocab, layout.sequence_parallel)
    scale_embedding_output(chunks, arch.embedding_multiplier())
    divide_logits(chunks, arch.logits_divisor())
    softcap_logits(chunks, arch.final_logit_softcap())
    _assign_rotary_tables(chunks, arch)
    shard_layout = ShardLayout(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=tp,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        num_query_groups=config.num_query_groups,
        head_dim=config.kv_channels,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab,
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        etp_size=ps.get_expert_tensor_parallel_world_size(),
        num_experts=config.num_moe_experts or 0,
    )
    return BuiltModel(chunks, shard_layout, use_te)
