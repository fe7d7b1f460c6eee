"""Gemma 2 and Gemma 3 (text; Gemma 3 1B, and the language model of the larger ones as `gemma3_text`).

Llama's layout with: RMSNorms that scale by (1 + weight) in float32, four per layer (before and after attention,
before and after the MLP: `input_layernorm`, `post_attention_layernorm` on the attention output,
`pre_feedforward_layernorm`, `post_feedforward_layernorm`); the embedding output times sqrt(hidden_size); a gated
GELU (tanh approximation); scores scaled by `query_pre_attn_scalar`^-0.5; a sliding window on the layers transformers
marks "sliding_attention"; tied embeddings by default.
- Gemma 2 soft-caps the attention scores (`attn_logit_softcapping`) and the final logits (`final_logit_softcapping`).
  transformers computes capped scores in eager attention, where a query with no visible key (left padding) averages
  every value: so does this. Under sequence parallelism, with a length tp does not divide, the sequence is padded and
  such a position averages those keys too: its logits (in the loss when the next label is real) are then
  transformers' for the batch padded the same way; every real position is exact.
- Gemma 3 adds per-head q/k RMSNorms and one rotary setting per layer type (local `rope_local_base_freq` on sliding
  layers, the global theta with linear scaling on full ones). transformers' Gemma 3 attention never applies
  `attn_logit_softcapping` (the config keeps it, the modules ignore it): neither does this; its final logits are
  soft-capped when `final_logit_softcapping` is set.
"""

from typing import Optional

from ..conversion.rules import Replicated, Rule
from ..errors import UnsupportedModelError
from .base import HF_LAYER, LAYER, DecoderArchitecture, register


@register
class Gemma2(DecoderArchitecture):
    model_types = ("gemma2",)

    def activation_name(self) -> str:
        return self.hf.hidden_activation

    def rms_norm_unit_offset(self) -> bool:
        return True

    def post_sublayer_norms(self) -> bool:
        return True

    def embedding_multiplier(self) -> Optional[float]:
        return self.hf.hidden_size**0.5

    def softmax_scale(self) -> Optional[float]:
        return self.hf.query_pre_attn_scalar**-0.5 * self.rope_attention_factor() ** 2

    def attention_logit_softcap(self) -> Optional[float]:
        return self.hf.attn_logit_softcapping

    def final_logit_softcap(self) -> Optional[float]:
        return self.hf.final_logit_softcapping

    def transformer_config(self) -> dict:
        hf = self.hf
        if getattr(hf, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                "use_bidirectional_attention=True: only causal attention is supported (the decoder of a causal LM)."
            )
        config = super().transformer_config()
        if hf.sliding_window is not None:
            config.update(self.layer_windows([kind == "sliding_attention" for kind in hf.layer_types]))
        return config

    def layer_rules(self) -> list[Rule]:
        return self.attention_rules() + self.mlp_rules() + [
            Replicated(LAYER + "input_layernorm.weight", HF_LAYER + "input_layernorm.weight"),
            Replicated(LAYER + "self_attention.linear_proj.post_norm.weight", HF_LAYER + "post_attention_layernorm.weight"),
            Replicated(LAYER + "pre_mlp_layernorm.weight", HF_LAYER + "pre_feedforward_layernorm.weight"),
            Replicated(LAYER + "mlp.linear_fc2.post_norm.weight", HF_LAYER + "post_feedforward_layernorm.weight"),
        ]


@register
class Gemma3Text(Gemma2):
    model_types = ("gemma3_text",)

    def qk_layernorm(self) -> bool:
        return True

    def attention_logit_softcap(self) -> Optional[float]:
        return None  # transformers' Gemma 3 attention does not apply the config's attn_logit_softcapping
