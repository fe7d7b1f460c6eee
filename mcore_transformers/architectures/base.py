"""The Llama-shaped decoder every dense family starts from: config translation and weight rules.

A family file subclasses `DecoderArchitecture`, registers its `model_type`, and overrides only what
its family does differently. The engine reads `transformer_config()`, `rules()`, `rope()` and
`sliding_window()`; it never asks which family it has.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from ..conversion.rules import Column, FusedGateUp, FusedQKV, Replicated, Row, Rule, VocabColumn
from ..errors import UnsupportedModelError

ARCHITECTURES: dict[str, type["DecoderArchitecture"]] = {}


def register(cls: type["DecoderArchitecture"]) -> type["DecoderArchitecture"]:
    for model_type in cls.model_types:
        ARCHITECTURES[model_type] = cls
    return cls


def get_architecture(hf_config: PretrainedConfig) -> "DecoderArchitecture":
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported. Supported: {', '.join(sorted(ARCHITECTURES))}. "
            "A new family is one file in mcore_transformers/architectures/."
        )
    return ARCHITECTURES[model_type](hf_config)


LAYER = "decoder.layers.{i}."
HF_LAYER = "model.layers.{i}."

# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear.
TE_FUSED_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

# Rope types whose frequencies depend only on the config (not on the running sequence length).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "proportional")


class DecoderArchitecture:
    """Llama: RMSNorm, rotary, GQA attention without biases, SwiGLU MLP."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hf_config: PretrainedConfig):
        self.hf = hf_config

    # ---- config translation ------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        hf = self.hf
        return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return getattr(self.hf, "num_key_value_heads", None) or self.hf.num_attention_heads

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.hf, "tie_word_embeddings", False))

    def qkv_bias(self) -> bool:
        return bool(getattr(self.hf, "attention_bias", False))

    def linear_bias(self) -> bool:
        """Bias on o_proj and the MLP projections (mcore has one switch for all of them)."""
        attention, mlp = bool(getattr(self.hf, "attention_bias", False)), bool(getattr(self.hf, "mlp_bias", False))
        if attention != mlp:
            raise UnsupportedModelError(
                f"attention_bias={attention} with mlp_bias={mlp}: megatron-core puts a bias on o_proj and the MLP "
                "together or on neither. Checkpoints with only one of them are not supported."
            )
        return attention

    def qk_layernorm(self) -> bool:
        return False

    def sliding_window(self) -> Optional[int]:
        """Attention window (keys within this distance are visible), or None for full causal attention."""
        return None

    def transformer_config(self) -> dict:
        """TransformerConfig kwargs describing the model (the layout and dtype are added by the builder)."""
        hf = self.hf
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act={hf.hidden_act!r}: only SwiGLU ('silu') MLPs are supported.")
        return dict(
            num_layers=hf.num_hidden_layers,
            hidden_size=hf.hidden_size,
            ffn_hidden_size=hf.intermediate_size,
            num_attention_heads=hf.num_attention_heads,
            num_query_groups=self.num_key_value_heads,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=hf.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=self.linear_bias(),
            add_qkv_bias=self.qkv_bias() or self.linear_bias(),
            qk_layernorm=self.qk_layernorm(),
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )

    def rope(self) -> torch.Tensor:
        """Rotary inverse frequencies exactly as transformers computes them for this config."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = getattr(self.hf, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type={rope_type!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})."
            )
        if rope_type == "default":
            base = params.get("rope_theta", getattr(self.hf, "rope_theta", 10000.0))
            dim = int(self.head_dim * params.get("partial_rotary_factor", 1.0))
            return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](self.hf, torch.device("cpu"))
        if attention_scaling != 1.0:
            raise UnsupportedModelError(f"rope_type={rope_type!r} with attention scaling {attention_scaling} is not supported.")
        return inv_freq

    # ---- weight rules ------------------------------------------------------------------------
    def rules(self) -> list[Rule]:
        return self.embedding_rules() + self.layer_rules()

    def embedding_rules(self) -> list[Rule]:
        rules = [
            VocabColumn("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
            Replicated("decoder.final_layernorm.weight", "model.norm.weight"),
        ]
        if self.tie_word_embeddings:
            # Only a pipeline's last stage holds this copy; the embedding rule exports the weight.
            rules.append(VocabColumn("output_layer.weight", "model.embed_tokens.weight", exported=False))
        else:
            rules.append(VocabColumn("output_layer.weight", "lm_head.weight"))
        return rules

    def layer_rules(self) -> list[Rule]:
        rules = self.attention_rules() + self.mlp_rules()
        rules += [
            Replicated(LAYER + "input_layernorm.weight", HF_LAYER + "input_layernorm.weight"),
            Replicated(LAYER + "pre_mlp_layernorm.weight", HF_LAYER + "post_attention_layernorm.weight"),
        ]
        return rules

    def attention_rules(self) -> list[Rule]:
        attn, hf_attn = LAYER + "self_attention.", HF_LAYER + "self_attn."
        qkv = lambda suffix: FusedQKV(  # noqa: E731
            attn + "linear_qkv." + suffix, *(hf_attn + f"{p}_proj." + suffix for p in "qkv")
        )
        rules: list[Rule] = [qkv("weight"), Row(attn + "linear_proj.weight", hf_attn + "o_proj.weight")]
        if self.qkv_bias() or self.linear_bias():
            rules.append(qkv("bias"))
        if self.linear_bias():
            rules.append(Replicated(attn + "linear_proj.bias", hf_attn + "o_proj.bias"))
        if self.qk_layernorm():
            rules += [
                Replicated(attn + "q_layernorm.weight", hf_attn + "q_norm.weight"),
                Replicated(attn + "k_layernorm.weight", hf_attn + "k_norm.weight"),
            ]
        return rules

    def mlp_rules(self) -> list[Rule]:
        mlp, hf_mlp = LAYER + "mlp.", HF_LAYER + "mlp."
        rules: list[Rule] = [
            FusedGateUp(mlp + "linear_fc1.weight", hf_mlp + "gate_proj.weight", hf_mlp + "up_proj.weight"),
            Row(mlp + "linear_fc2.weight", hf_mlp + "down_proj.weight"),
        ]
        if self.linear_bias():
            rules += [
                FusedGateUp(mlp + "linear_fc1.bias", hf_mlp + "gate_proj.bias", hf_mlp + "up_proj.bias"),
                Replicated(mlp + "linear_fc2.bias", hf_mlp + "down_proj.bias"),
            ]
        return rules
