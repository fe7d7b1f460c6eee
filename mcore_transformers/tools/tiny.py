"""Small random HF checkpoints written by transformers itself: the test oracle and the offline demo model."""

from __future__ import annotations

import os
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Small but not degenerate: GQA (4 heads, 2 KV heads), 4 layers so pp=2 and pp=2·vpp=2 both fit.
BASE = dict(
    vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
)

FAMILIES: dict[str, dict] = {
    "llama": dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }),
    "mistral": dict(sliding_window=7),
    "qwen2": dict(),
    "qwen3": dict(head_dim=24),  # head_dim != hidden / heads
    # q/k/v and gate/up each one tensor; a window; longrope switching to its long factors past 8 positions (with
    # the attention factor of 256 / 8); transformers' default pad id (32000) is past this vocabulary
    "phi3": dict(sliding_window=7, pad_token_id=None, bos_token_id=1, eos_token_id=2, original_max_position_embeddings=8,
                 rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                               "long_factor": [2.0 + 0.5 * i for i in range(8)]}),
    # no rotary on every second layer, and (transformers' rule) a window of 5 on exactly those; tied embeddings
    "smollm3": dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=5, tie_word_embeddings=True,
                    pad_token_id=None, bos_token_id=1, eos_token_id=2),
    "ernie4_5": dict(head_dim=16, use_bias=True, pad_token_id=0),  # interleaved rotary, biases on every linear
    # Granite 3's four scalars (its own values: embeddings ×12, residual branches ×0.22, scores ×1/64, logits ÷8)
    "granite": dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                    logits_scaling=8.0),
    "glm4": dict(head_dim=16, pad_token_id=None, eos_token_id=2),  # post-sublayer norms, half-head interleaved rotary
    "olmo2": dict(pad_token_id=0, num_key_value_heads=4),  # only post-sublayer norms; q/k norms over all heads (MHA)
    "olmo3": dict(pad_token_id=0, num_key_value_heads=4, sliding_window=5),  # + a window on 3 of every 4 layers
    # (1 + w) norms before and after each sublayer, scaled embeddings, gated GELU, a score scale of 24^-0.5, a window of
    # 5 on alternate layers; tied embeddings, pad id 0. Gemma 2: both soft caps small enough to change the logits.
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=5, tie_word_embeddings=True,
                   attn_logit_softcapping=0.03, final_logit_softcapping=0.5),
    # Gemma 3: + q/k norms and one rotary table per layer type (local theta; global theta with linear scaling)
    "gemma3_text": dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=5, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
    ),
    # Mixtures of experts: 4 or 8 small experts, so ep=2 splits them and routing has real choices.
    "qwen3_moe": dict(head_dim=24, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "qwen2_moe": dict(  # one dense layer among the MoE layers; shared expert with its sigmoid gate
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        mlp_only_layers=[1],
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, sliding_window=7),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32),
    # LayerNorms with biases; SparseMixer top-2 of 6 within a relative 2 · 0.1 of each choice's best logit (some
    # tokens' weights come from a softmax over several logits, some are exactly 1); input jitter (identity in eval);
    # biases on q/k/v/o and the LM head, none on the experts; longrope with the published config's equal mscales and
    # distinct short / long factors, switching past 8 positions (transformers keeps the short factors)
    "phimoe": dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=32, sliding_window=7,
                   router_jitter_noise=0.1, input_jitter_noise=0.01, attention_bias=True, lm_head_bias=True,
                   rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                 "long_factor": [2.0 + 0.5 * i for i in range(8)], "short_mscale": 1.243163121016122,
                                 "long_mscale": 1.243163121016122, "original_max_position_embeddings": 8}),
    "deepseek_v3": dict(  # MLA with YaRN, group-limited sigmoid routing, shared expert, first layer dense
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
        moe_intermediate_size=32, n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # rotate-half rotary on 8 of 16 dims, q/k/v biases, per-head q/k norms; DeepSeek-V3's routing (4 of 16 experts from
    # the best 2 of 4 groups), a shared expert, the first layer dense
    "glm4_moe": dict(
        head_dim=16, attention_bias=True, use_qk_norm=True, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, moe_intermediate_size=32, n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
    ),
    # MLA (value heads wider than the no-rotary key part) whose latent norms keep eps 1e-6 while rms_norm_eps differs
    # (1e-5 in GLM-4.7-Flash; 1e-3 here, where the small latents make the difference plain); dense and sparse layers
    # alternating (mlp_layer_types)
    "glm4_moe_lite": dict(
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        routed_scaling_factor=1.8, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=24, rms_norm_eps=1e-3, mlp_layer_types=["dense", "sparse", "dense", "sparse"],
    ),
    # DeepSeek-V2's shape: MLA with YaRN (V2's mscale); softmax routing limited to the 2 of 4 groups with the best
    # single score (megatron's own router would rank by the best two), scaled by 16; two shared experts; first layer dense
    "deepseek_v2": dict(
        num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", moe_intermediate_size=32, n_shared_experts=2, routed_scaling_factor=16.0,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    # interleaved rotary; softmax routing (2 of 8) chosen with a score-correction bias, renormalised; a shared expert;
    # MoE on layers 1-2 only (moe_layer_start_index / moe_layer_end_index), layers 0 and 3 dense
    "ernie4_5_moe": dict(
        head_dim=16, pad_token_id=0, moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
        moe_layer_start_index=1, moe_layer_end_index=2,
    ),
    # q/k norms over all heads, rotate-half rotary on 8 of 16 dims; sigmoid routing (2 of 8) chosen with a correction
    # bias, no shared expert
    "minimax_m2": dict(head_dim=16, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, rotary_dim=8,
                       bos_token_id=1, eos_token_id=2),
    # Granite's scalars on a Mixtral-routed mixture of 4 experts (stacked on disk)
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, embedding_multiplier=12.0,
                       residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=8.0),
    "gpt_oss": dict(  # sinks, biases, clamped SwiGLU, a window of 4 on alternate layers, YaRN
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=4,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                      "original_max_position_embeddings": 64, "rope_theta": 150000.0},
    ),
}
MOE_FAMILIES = (
    "qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss", "glm4_moe", "glm4_moe_lite", "deepseek_v2",
    "ernie4_5_moe", "minimax_m2", "granitemoe", "phimoe",
)


def tiny_config(model_type: str, **overrides):
    kwargs = {**BASE, **FAMILIES[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def make_tiny_checkpoint(
    folder: str, model_type: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
    max_shard_size: Optional[str] = None, stacked_experts: bool = False, **overrides,
) -> str:
    """Write a random `model_type` checkpoint with transformers' own save_pretrained; returns the folder.

    `stacked_experts=True` writes the model's state dict as transformers holds it in memory instead
    (MoE experts stacked: `mlp.experts.gate_up_proj` [E, 2·I, H]), a layout transformers also loads.
    """
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise so the test sees them
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
        for name, buffer in model.named_buffers():  # routing score corrections (DeepSeek-V3)
            if name.endswith("_bias") and buffer.is_floating_point():
                buffer.add_(torch.randn_like(buffer) * 0.1)
    os.makedirs(folder, exist_ok=True)
    if stacked_experts:
        from safetensors.torch import save_file

        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder
