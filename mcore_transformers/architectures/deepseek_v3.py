"""DeepSeek-V3: multi-latent attention (MLA) and sigmoid-scored routing with a score correction bias.
Its mixture of experts (`DeepseekMoE`) is shared with GLM-4.5 (glm4_moe), its MLA with DeepSeek-V2 and GLM-4.7-Flash.

- Attention: q through a low-rank bottleneck (q_a_proj → q_a_layernorm → q_b_proj, or one q_proj when
  q_lora_rank is None); k/v from a shared latent (kv_a_proj_with_mqa → kv_a_layernorm → kv_b_proj) plus
  a rotary part. megatron's MLA applies the rotary itself, YaRN included, on DeepSeek's interleaved
  rotary layout, at positions 0..s-1 of the forward (it does not take position ids).
- Routing ("noaux_tc"): sigmoid scores; `e_score_correction_bias` (megatron's expert_bias buffer)
  only steers the choice; experts are picked within the best `topk_group` of `n_group` groups; the
  chosen scores are renormalised and scaled by `routed_scaling_factor`.
- Shared experts on every MoE layer; the first `first_k_dense_replace` layers are dense.
- Multi-token-prediction layers (`model.layers.{num_hidden_layers + k}`) are not used by transformers;
  they are not loaded and are copied through verbatim on save.
"""

from typing import Optional

import torch

from ..conversion.rules import Column, Replicated, Row, Rule
from ..errors import UnsupportedModelError
from .base import HF_LAYER, LAYER, MoEDecoder, register


class DeepseekMoE(MoEDecoder):
    """DeepSeek's mixture of experts: `n_routed_experts` with sigmoid ("noaux_tc") routing, `n_shared_experts`
    shared experts, dense first `first_k_dense_replace` layers."""

    hf_shared_expert = "shared_experts."
    hf_expert_bias = "gate.e_score_correction_bias"

    def num_experts(self) -> int:
        return self.hf.n_routed_experts

    def shared_expert_size(self) -> Optional[int]:
        shared = getattr(self.hf, "n_shared_experts", None)
        return self.hf.moe_intermediate_size * shared if shared else None

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= (self.hf.first_k_dense_replace or 0)

    def router_precision(self) -> str:
        return "float32"  # gate.weight kept in float32, scores in float32 whatever the model dtype

    def router_config(self) -> dict:
        hf, top_k = self.hf, self.experts_per_token()
        if top_k > 1 and not self.normalize_top_k():
            raise UnsupportedModelError(
                "sigmoid routing with norm_topk_prob=False: megatron always renormalises the top-k weights."
            )
        config = dict(
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_topk_scaling_factor=hf.routed_scaling_factor,
        )
        groups, chosen = hf.n_group or 1, hf.topk_group or 1
        if 1 < groups and chosen < groups:
            # transformers ranks a group by the sum of its two best scores; megatron by its top_k // topk_group.
            if top_k // chosen != 2:
                raise UnsupportedModelError(
                    f"group-limited routing with num_experts_per_tok={top_k}, topk_group={chosen}: megatron ranks "
                    "groups by their top (num_experts_per_tok // topk_group) scores, transformers by their top 2."
                )
            config.update(moe_router_num_groups=groups, moe_router_group_topk=chosen)
        return config


@register
class DeepseekV3(DeepseekMoE):
    model_types = ("deepseek_v3",)

    # ---- attention (MLA) -----------------------------------------------------------------------
    def qk_layernorm(self) -> bool:
        return True  # megatron builds MLA's q/kv latent norms only with qk_layernorm

    def mla_latent_norm_eps(self) -> Optional[float]:
        return 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with RMSNorm's default, not rms_norm_eps

    def _rope_parameters(self) -> dict:
        return getattr(self.hf, "rope_parameters", None) or {}

    def mla_config(self) -> dict:
        hf, rope = self.hf, self._rope_parameters()
        if getattr(hf, "attention_bias", False):
            raise UnsupportedModelError("DeepSeek attention_bias=True: megatron's MLA projections have no bias.")
        if not getattr(hf, "rope_interleave", True):
            raise UnsupportedModelError(
                "rope_interleave=False: megatron's MLA always reads the rotary dimensions as interleaved pairs."
            )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError(
                f"partial_rotary_factor={rope['partial_rotary_factor']}: megatron's MLA rotates all "
                "qk_rope_head_dim dimensions of each head."
            )
        config = dict(
            multi_latent_attention=True,
            q_lora_rank=hf.q_lora_rank,
            kv_lora_rank=hf.kv_lora_rank,
            qk_head_dim=hf.qk_nope_head_dim,
            qk_pos_emb_head_dim=hf.qk_rope_head_dim,
            v_head_dim=hf.v_head_dim,
            kv_channels=hf.v_head_dim,
            rotary_base=rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)),
        )
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default":
            return dict(config, rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
        if rope_type != "yarn":
            raise UnsupportedModelError(
                f"MLA with rope_type={rope_type!r}: megatron's MLA has plain and YaRN rotary only."
            )
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        odd = rope.get("attention_factor") is not None or (mscale_all_dim and not mscale)
        if odd or not rope.get("truncate", True):
            raise UnsupportedModelError(
                f"YaRN parameters {rope}: megatron's YaRN takes mscale and mscale_all_dim together, no explicit "
                "attention_factor, and rounds the correction range (truncate=True)."
            )
        return dict(
            config,
            rope_type="yarn",
            rotary_scaling_factor=rope["factor"],
            original_max_position_embeddings=rope.get("original_max_position_embeddings") or hf.max_position_embeddings,
            beta_fast=rope.get("beta_fast") or 32.0,
            beta_slow=rope.get("beta_slow") or 1.0,
            mscale=mscale if mscale_all_dim else 1.0,
            mscale_all_dim=mscale_all_dim or 0.0,
        )

    def transformer_config(self) -> dict:
        return {**super().transformer_config(), **self.mla_config()}

    def rope(self) -> torch.Tensor:
        """Unused by MLA (it applies its own rotary); the plain frequencies of the rotary part."""
        dim, base = self.hf.qk_rope_head_dim, self.mla_config()["rotary_base"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))

    def softmax_scale(self) -> Optional[float]:
        return None  # MLA sets its own (YaRN mscale_all_dim included)

    def attention_rules(self) -> list[Rule]:
        attn, hf_attn = LAYER + "self_attention.", HF_LAYER + "self_attn."
        if self.hf.q_lora_rank is None:
            query = [Column(attn + "linear_q_proj.weight", hf_attn + "q_proj.weight")]
        else:
            query = [
                Column(attn + "linear_q_down_proj.weight", hf_attn + "q_a_proj.weight"),
                Replicated(attn + "q_layernorm.weight", hf_attn + "q_a_layernorm.weight"),
                Column(attn + "linear_q_up_proj.weight", hf_attn + "q_b_proj.weight"),
            ]
        return query + [
            Column(attn + "linear_kv_down_proj.weight", hf_attn + "kv_a_proj_with_mqa.weight"),
            Replicated(attn + "kv_layernorm.weight", hf_attn + "kv_a_layernorm.weight"),
            Column(attn + "linear_kv_up_proj.weight", hf_attn + "kv_b_proj.weight"),
            Row(attn + "linear_proj.weight", hf_attn + "o_proj.weight"),
        ]
