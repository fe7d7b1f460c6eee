"""The Llama-shaped decoder every dense family starts from: config translation and weight rules.

A family file subclasses `DecoderArchitecture`, registers its `model_type`, and overrides only what
its family does differently. The engine reads `transformer_config()`, `rules()`, `rotary_tables()`,
`sliding_window()` and the other switches below; it never asks which family it has.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from ..conversion.rules import (
    Column,
    Expert,
    ExpertStack,
    FusedGateUp,
    FusedQKV,
    GateUpRows,
    OneOf,
    Replicated,
    Row,
    Rule,
    VocabColumn,
    with_hf_names,
)
from ..errors import UnsupportedModelError
from .rotary import RotarySettings

ARCHITECTURES: dict[str, type["DecoderArchitecture"]] = {}


def register(cls: type["DecoderArchitecture"]) -> type["DecoderArchitecture"]:
    for model_type in cls.model_types:
        ARCHITECTURES[model_type] = cls
    return cls


def get_architecture(hf_config: PretrainedConfig, **nesting) -> "DecoderArchitecture":
    """The architecture of a decoder config; `nesting` (`hf_rename`, `tie_word_embeddings`) places it inside a
    bigger model's checkpoint (a vision-language model's language model)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        if getattr(hf_config, "vision_config", None) is not None:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is a vision-language model: load it with MCoreModelForImageTextToText "
                "(mcore_transformers.multimodal lists the supported families)."
            )
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported. Supported: {', '.join(sorted(ARCHITECTURES))}. "
            "A new family is one file in mcore_transformers/architectures/."
        )
    return ARCHITECTURES[model_type](hf_config, **nesting)


LAYER = "decoder.layers.{i}."
HF_LAYER = "model.layers.{i}."

# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear.
# A rule matches either name (an MoE layer keeps its pre-MLP norm as a module under TE too).
TE_FUSED_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
    "self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
    "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
}

# Rope types whose frequencies depend only on the config (not on the running sequence length), and longrope,
# whose two sets of frequencies `long_rope` gives.
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (transformers' "gelu_pytorch_tanh")."""
    return F.gelu(x, approximate="tanh")


# transformers' activation names → the function megatron's gated MLP applies to the gate.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu_pytorch_tanh": gelu_tanh}


class DecoderArchitecture(RotarySettings):
    """Llama: RMSNorm, rotary, GQA attention without biases, SwiGLU MLP."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        hf_config: PretrainedConfig,
        hf_rename: Optional[Callable[[str], str]] = None,
        tie_word_embeddings: Optional[bool] = None,
    ):
        self.hf = hf_config
        # A decoder nested in a bigger checkpoint: its HF names there, and the tying its parent config declares.
        self.hf_rename = hf_rename
        self._tie_word_embeddings = tie_word_embeddings

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
        if self._tie_word_embeddings is not None:
            return self._tie_word_embeddings
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

    def attention_output_bias(self) -> bool:
        """A bias on o_proj while the MLP has none (PhiMoE's `attention_bias`): megatron's `add_bias_linear` would put
        one on the MLP too, so attention's linear_proj gets one of its own (`layers.with_bias`)."""
        return False

    def lm_head_bias(self) -> bool:
        """The LM head has a bias (PhiMoE's `lm_head_bias`), vocabulary-sharded like the head's rows; megatron's output
        layer has none (`stream_ends.add_output_bias`)."""
        return False

    def qk_layernorm(self) -> bool:
        return False

    def qk_norm_over_heads(self) -> bool:
        """True: the q/k norms span the whole projection (all heads), not each head (OLMo, OLMoE)."""
        return False

    def rms_norm_weight_in_float32(self) -> bool:
        """True: RMSNorm multiplies by its weight before casting back to the input dtype (GPT-OSS);
        False: after (Llama and most others)."""
        return False

    def layer_norm_with_bias(self) -> bool:
        """True: every norm is a LayerNorm with a bias (PhiMoE's `nn.LayerNorm`, eps `rms_norm_eps`); False: RMSNorm."""
        return False

    def rms_norm_unit_offset(self) -> bool:
        """True: every RMSNorm scales by (1 + weight), in float32, then casts back (Gemma); the checkpoint's weight
        is stored as it is (megatron's `layernorm_zero_centered_gamma`)."""
        return False

    def embedding_multiplier(self) -> Optional[float]:
        """A factor on the embedding output, cast to the model dtype first as transformers does (Gemma: sqrt(hidden));
        None: none."""
        return None

    def attention_logit_softcap(self) -> Optional[float]:
        """`cap · tanh(scores / cap)` on the scaled attention scores before the mask and softmax (Gemma 2); None: none."""
        return None

    def residual_multiplier(self) -> Optional[float]:
        """A factor on each sublayer's output (attention's, the MLP's; bias included) before its residual add (Granite's
        `residual_multiplier`); None: none."""
        return None

    def logits_divisor(self) -> Optional[float]:
        """The LM head's logits divided by this (Granite's `logits_scaling`); None: not divided."""
        return None

    def final_logit_softcap(self) -> Optional[float]:
        """`cap · tanh(logits / cap)` on the LM head's logits (Gemma 2); None: none."""
        return None

    def pre_sublayer_norms(self) -> bool:
        """False: no norm before attention and before the MLP (OLMo2 normalises only their outputs)."""
        return True

    def post_sublayer_norms(self) -> bool:
        """True: the outputs of attention and of the MLP are normalised before the residual add (GLM-4); their
        norms are `self_attention.linear_proj.post_norm` and `mlp.linear_fc2.post_norm`."""
        return False

    def rotary_interleaved(self) -> bool:
        """True: rotary pairs adjacent elements (GLM style: x[0::2], x[1::2]); False: the two halves of the head."""
        return False

    def rotary_components(self) -> Optional[torch.Tensor]:
        """Multimodal rotary (Qwen-VL's M-RoPE): for each rotary frequency, which of the three position components
        (temporal, height, width) rotates it, as a `[rotary_dim / 2]` index tensor. None: one position per token."""
        return None

    def sliding_window(self) -> Optional[int]:
        """Attention window (keys within this distance are visible), or None for full causal attention."""
        return None

    def layer_windows(self, sliding: list[bool]) -> dict:
        """TransformerConfig kwargs for a sliding window of `sliding_window` keys on the layers marked True
        (transformers' `layer_types`); none when no layer has one."""
        if not any(sliding):
            return {}
        return dict(window_size=(self.hf.sliding_window - 1, 0), window_attn_skip_freq=[int(s) for s in sliding])

    def activation_name(self) -> str:
        """transformers' name of the MLP's gate activation."""
        return getattr(self.hf, "hidden_act", "silu")

    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        name = self.activation_name()
        if name not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"MLP activation {name!r} (the config's hidden_act / hidden_activation): only gated MLPs with "
                f"{', '.join(repr(a) for a in ACTIVATIONS)} are supported."
            )
        return ACTIVATIONS[name]

    def transformer_config(self) -> dict:
        """TransformerConfig kwargs describing the model (the layout and dtype are added by the builder)."""
        hf = self.hf
        if getattr(hf, "clip_qkv", None) is not None:  # OLMo / OLMoE / OLMo2 configs
            raise UnsupportedModelError(f"clip_qkv={hf.clip_qkv}: megatron-core has no clamp on the q/k/v projections.")
        return dict(
            num_layers=hf.num_hidden_layers,
            hidden_size=hf.hidden_size,
            ffn_hidden_size=hf.intermediate_size,
            num_attention_heads=hf.num_attention_heads,
            num_query_groups=self.num_key_value_heads,
            kv_channels=self.head_dim,
            normalization="LayerNorm" if self.layer_norm_with_bias() else "RMSNorm",
            layernorm_epsilon=hf.rms_norm_eps,
            layernorm_zero_centered_gamma=self.rms_norm_unit_offset(),
            gated_linear_unit=True,
            activation_func=self.activation(),
            add_bias_linear=self.linear_bias(),
            add_qkv_bias=self.qkv_bias() or self.linear_bias(),
            qk_layernorm=self.qk_layernorm(),
            rotary_interleaved=self.rotary_interleaved(),
            softmax_scale=self.softmax_scale(),
            hidden_dropout=0.0,  # transformers' decoder families have no residual dropout
            attention_dropout=float(getattr(hf, "attention_dropout", 0.0) or 0.0),  # on the attention probabilities
            **self.moe_config(),
        )

    def moe_config(self) -> dict:
        """TransformerConfig kwargs of a mixture-of-experts MLP; a dense family has none."""
        return {}

    def router_aux_loss(self) -> Optional[tuple[int, int, float]]:
        """(experts, top_k, coefficient) of transformers' MoE load-balancing loss; None: the family has none."""
        return None

    def expert_groups_ranked_by_best_score(self) -> bool:
        """Group-limited routing (`moe_router_num_groups` / `moe_router_group_topk`) that ranks each group of experts
        by its best score (DeepSeek-V2's "group_limited_greedy"); False: by the sum of its top (top_k // group_topk)
        scores, megatron's ranking."""
        return False

    def softmax_routing_selection_bias_floor(self) -> Optional[float]:
        """Softmax routing whose choice of experts adds a score-correction bias (`router.expert_bias`, steering only the
        choice) to the probabilities, the chosen probabilities renormalised by their sum clamped below at the returned
        floor (ERNIE-4.5's `moe_norm_min`). None: megatron's routing (which takes such a bias with sigmoid scores only)."""
        return None

    def softmax_weights_dtype(self) -> Optional[str]:
        """Softmax routing as transformers' Qwen-MoE / OLMoE / Mixtral routers compute it (`routers.ProbabilityTopKRouter`):
        a float32 softmax over all experts, the top-k chosen by probability, renormalised in float32 (`normalize_top_k`),
        the weights then cast to the logits' dtype ("model") or kept in "float32" (Mixtral). None: megatron's routing,
        which in a bf16 model chooses among probabilities rounded to bf16 (ties transformers does not have)."""
        return None

    def router_precision(self) -> str:
        """Where transformers' router rounds in a bfloat16 / float16 model.

        "model": logits in the model dtype (megatron's default router arithmetic).
        "float32": the router weight kept unrounded (transformers' `_keep_in_fp32_modules_strict` names `gate.weight`;
        saved back in the checkpoint's dtype), logits and scores in float32 (DeepSeek-V2/V3, GLM-4.5, ERNIE-4.5).
        "float32_scores": weight, logits and score-correction bias in the model dtype, the scores computed from the
        rounded logits in float32 (MiniMax-M2).
        """
        return "model"

    def sparse_mixer_jitter_eps(self) -> Optional[float]:
        """SparseMixer top-2 routing (PhiMoE): each chosen expert weighted by a softmax over the logits within a relative
        2·eps of it (`routers.SparseMixerRouter`); returns eps (`router_jitter_noise`). None: megatron's routing."""
        return None

    def mla_latent_norm_eps(self) -> Optional[float]:
        """Epsilon of multi-latent attention's q/kv latent norms, where it is not the config's `rms_norm_eps`."""
        return None

    def module_path(self, tensor_path: str) -> str:
        """The module path transformers' model has for a tensor path of the checkpoint (they differ where a
        checkpoint keeps an older layout than transformers' modules: peft names LoRA targets by module path)."""
        return tensor_path

    # ---- weight rules ------------------------------------------------------------------------
    def rules(self) -> list[Rule]:
        rules = self.embedding_rules() + self.layer_rules()
        if self.hf_rename is None:
            return rules
        return [with_hf_names(rule, self.hf_rename) for rule in rules]

    def embedding_rules(self) -> list[Rule]:
        rules = [
            VocabColumn("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
            Replicated("decoder.final_layernorm.weight", "model.norm.weight"),
        ]
        if self.layer_norm_with_bias():
            rules.append(Replicated("decoder.final_layernorm.bias", "model.norm.bias"))
        if self.tie_word_embeddings:
            # Only a pipeline's last stage holds this copy; the embedding rule exports the weight.
            rules.append(VocabColumn("output_layer.weight", "model.embed_tokens.weight", exported=False))
        else:
            rules.append(VocabColumn("output_layer.weight", "lm_head.weight"))
        if self.lm_head_bias():
            rules.append(VocabColumn("output_layer.bias", "lm_head.bias"))
        return rules

    def layer_rules(self) -> list[Rule]:
        rules = self.attention_rules() + self.mlp_rules()
        if self.pre_sublayer_norms():
            rules += [
                Replicated(LAYER + "input_layernorm.weight", HF_LAYER + "input_layernorm.weight"),
                Replicated(LAYER + "pre_mlp_layernorm.weight", HF_LAYER + "post_attention_layernorm.weight"),
            ]
            if self.layer_norm_with_bias():
                rules += [
                    Replicated(LAYER + "input_layernorm.bias", HF_LAYER + "input_layernorm.bias"),
                    Replicated(LAYER + "pre_mlp_layernorm.bias", HF_LAYER + "post_attention_layernorm.bias"),
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
        if self.linear_bias() or self.attention_output_bias():
            rules.append(Replicated(attn + "linear_proj.bias", hf_attn + "o_proj.bias"))
        if self.qk_layernorm():
            # A norm over one head is the same on every rank; one over all heads is split with them.
            norm = Column if self.qk_norm_over_heads() else Replicated
            rules += [
                norm(attn + "q_layernorm.weight", hf_attn + "q_norm.weight"),
                norm(attn + "k_layernorm.weight", hf_attn + "k_norm.weight"),
            ]
        return rules

    def mlp_rules(self) -> list[Rule]:
        return self.dense_mlp_rules()

    def packed_gate_up(self) -> bool:
        """HF keeps gate and up in one `gate_up_proj` (gate rows, then up rows): Phi-3, GLM-4."""
        return False

    def dense_mlp_rules(self, hf_mlp: str = HF_LAYER + "mlp.") -> list[Rule]:
        mlp = LAYER + "mlp."
        if self.packed_gate_up():
            fc1: Rule = GateUpRows(mlp + "linear_fc1.weight", hf_mlp + "gate_up_proj.weight")
        else:
            fc1 = FusedGateUp(mlp + "linear_fc1.weight", hf_mlp + "gate_proj.weight", hf_mlp + "up_proj.weight")
        rules: list[Rule] = [fc1, Row(mlp + "linear_fc2.weight", hf_mlp + "down_proj.weight")]
        if self.linear_bias():
            rules += [
                FusedGateUp(mlp + "linear_fc1.bias", hf_mlp + "gate_proj.bias", hf_mlp + "up_proj.bias"),
                Replicated(mlp + "linear_fc2.bias", hf_mlp + "down_proj.bias"),
            ]
        return rules


class MoEDecoder(DecoderArchitecture):
    """A decoder whose MLP is a routed mixture of experts (megatron-core's MoELayer), on all or some layers.

    A family names its HF tensors with the class attributes below (relative to `model.layers.{i}.`)
    and overrides the routing hooks that differ. Routed experts are megatron's
    `mlp.experts.local_experts.{e}` (grouped-GEMM `weight{e}` names bind to the same rules);
    `{e}` in HF names is the global expert index.

    Checkpoints store routed experts one tensor per expert and projection (what transformers'
    save_pretrained writes for these families) or stacked as transformers holds them in memory
    (`mlp.experts.gate_up_proj` [E, 2·I, H], `mlp.experts.down_proj` [E, H, I]; transformers loads
    and re-saves that layout too). Both are read; a model saves back the layout it was loaded from.
    """

    hf_moe: ClassVar[str] = "mlp."  # the sparse block
    hf_router: ClassVar[str] = "gate.weight"
    hf_stacked_router: ClassVar[Optional[str]] = None  # its name in the in-memory layout, where not `hf_router`
    hf_stacked_moe: ClassVar[str] = "mlp."  # the sparse block in transformers' in-memory (stacked) layout
    hf_expert: ClassVar[str] = "experts.{e}."
    hf_expert_gate_up_down: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    hf_shared_expert: ClassVar[Optional[str]] = None  # e.g. "shared_expert."
    hf_shared_expert_gate: ClassVar[Optional[str]] = None  # sigmoid gate on the shared expert's output
    hf_expert_bias: ClassVar[Optional[str]] = None  # routing-only score correction (DeepSeek-V3)

    # ---- routing -----------------------------------------------------------------------------
    def num_experts(self) -> int:
        return self.hf.num_experts

    def experts_per_token(self) -> int:
        return self.hf.num_experts_per_tok

    def moe_intermediate_size(self) -> int:
        return self.hf.moe_intermediate_size

    def normalize_top_k(self) -> bool:
        """Top-k routing weights renormalised to sum to one."""
        return bool(getattr(self.hf, "norm_topk_prob", False))

    def shared_expert_size(self) -> Optional[int]:
        return None

    def is_moe_layer(self, layer: int) -> bool:
        return True

    def router_config(self) -> dict:
        """Softmax over all experts, top-k, optionally renormalised (Qwen-MoE, Mixtral, OLMoE)."""
        top_k = self.experts_per_token()
        if top_k == 1 and self.normalize_top_k():
            raise UnsupportedModelError(
                "top-1 routing with renormalised weights (a weight of exactly 1) has no megatron-core router."
            )
        # Renormalised softmax top-k == softmax over the top-k logits (mcore without pre-softmax).
        return dict(moe_router_score_function="softmax", moe_router_pre_softmax=not self.normalize_top_k())

    def moe_config(self) -> dict:
        hf = self.hf
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act={hf.hidden_act!r}: only SwiGLU ('silu') experts are supported.")
        # Mixtral, MiniMax-M2 (PhiMoE's router_jitter_noise is SparseMixer's threshold instead)
        if getattr(hf, "router_jitter_noise", 0.0) and self.sparse_mixer_jitter_eps() is None:
            raise UnsupportedModelError(
                f"router_jitter_noise={hf.router_jitter_noise}: transformers scales the MoE input by random noise while "
                "training; megatron-core's input jitter is another formula. Set it to 0."
            )
        shared = self.shared_expert_size()
        return dict(
            num_moe_experts=self.num_experts(),
            moe_ffn_hidden_size=self.moe_intermediate_size(),
            moe_router_topk=self.experts_per_token(),
            moe_layer_freq=[int(self.is_moe_layer(i)) for i in range(hf.num_hidden_layers)],
            moe_shared_expert_intermediate_size=shared,
            moe_shared_expert_gate=shared is not None and self.hf_shared_expert_gate is not None,
            # megatron's own auxiliary losses stay off: transformers adds its load-balancing loss only with
            # config.output_router_logits, and with another formula (see `router_aux_loss`), which the
            # trainer and the model's forward compute themselves.
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            # float32 logits ("float32_scores": rounded to the model dtype first; routers.router_for adds the mixin)
            moe_router_dtype=None if self.router_precision() == "model" else "fp32",
            **self.router_config(),
        )

    def router_aux_loss(self) -> Optional[tuple[int, int, float]]:
        """transformers' `load_balancing_loss_func` for this family: (experts, top_k, router_aux_loss_coef).

        Qwen2/3-MoE, Mixtral, OLMoE and GPT-OSS share one function: the softmax of each layer's router
        logits, top-k assignment counts and mean probabilities pooled over all MoE layers and unmasked
        tokens, E · Σ_e f_e · P_e. megatron's "aux_loss" differs (per layer, summed over layers, divided
        by top-k, over the tokens of a micro-batch), so the trainer computes this one (training/step.py).
        A family whose transformers model has no such loss (no `router_aux_loss_coef`, e.g. DeepSeek-V3)
        returns None.
        """
        coefficient = getattr(self.hf, "router_aux_loss_coef", None)
        if coefficient is None:
            return None
        return self.num_experts(), self.experts_per_token(), float(coefficient)

    # ---- weight rules ------------------------------------------------------------------------
    def mlp_rules(self) -> list[Rule]:
        hf_moe = HF_LAYER + self.hf_moe
        mlp = LAYER + "mlp."
        router: Rule = Replicated(mlp + "router.weight", hf_moe + self.hf_router)
        if self.hf_stacked_moe != self.hf_moe:
            in_memory = HF_LAYER + self.hf_stacked_moe + (self.hf_stacked_router or self.hf_router)
            router = OneOf(router, Replicated(mlp + "router.weight", in_memory))
        rules: list[Rule] = [router]
        if self.hf_expert_bias is not None:
            bias: Rule = Replicated(mlp + "router.expert_bias", hf_moe + self.hf_expert_bias)
            if self.hf_stacked_moe != self.hf_moe:
                in_memory = HF_LAYER + self.hf_stacked_moe + self.hf_expert_bias
                bias = OneOf(bias, Replicated(mlp + "router.expert_bias", in_memory))
            rules.append(bias)
        rules += self.expert_rules(mlp + "experts.local_experts.{e}.", hf_moe + self.hf_expert)
        if self.hf_shared_expert is not None:
            shared, hf_shared = mlp + "shared_experts.", hf_moe + self.hf_shared_expert
            gate, up, down = self.hf_expert_gate_up_down
            rules += [
                FusedGateUp(shared + "linear_fc1.weight", hf_shared + f"{gate}.weight", hf_shared + f"{up}.weight"),
                Row(shared + "linear_fc2.weight", hf_shared + f"{down}.weight"),
            ]
            if self.hf_shared_expert_gate is not None:
                rules.append(Replicated(shared + "gate_weight", hf_moe + self.hf_shared_expert_gate))
        if not all(self.is_moe_layer(i) for i in range(self.hf.num_hidden_layers)):
            rules += self.dense_mlp_rules()  # dense layers bind these; MoE layers have no such parameters
        return rules

    def expert_rules(self, expert: str, hf_expert: str) -> list[Rule]:
        gate, up, down = self.hf_expert_gate_up_down
        stacked = HF_LAYER + self.hf_stacked_moe + "experts."
        return [
            OneOf(
                Expert(
                    FusedGateUp(expert + "linear_fc1.weight", hf_expert + f"{gate}.weight", hf_expert + f"{up}.weight")
                ),
                ExpertStack(GateUpRows(expert + "linear_fc1.weight", stacked + "gate_up_proj")),
            ),
            OneOf(
                Expert(Row(expert + "linear_fc2.weight", hf_expert + f"{down}.weight")),
                ExpertStack(Row(expert + "linear_fc2.weight", stacked + "down_proj")),
            ),
        ]
