"""Layer-spec modules we supply to megatron-core (subclasses, not patches)."""

from __future__ import annotations

from megatron.core.transformer.dot_product_attention import DotProductAttention


class MaskedRowsDotProductAttention(DotProductAttention):
    """mcore's attention core, with HF's answer for a query that may attend to no key: a zero output.

    mcore fills masked scores with -10000, so a fully masked row (a left-padding query) averages every
    value; torch's sdpa, and so transformers, return zeros there. Padding positions feed later layers
    only through masked keys, but their own logits reach the loss when the next label is real.
    """

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        context = super().forward(query, key, value, attention_mask, *args, **kwargs)
        if attention_mask is None:
            return context
        blind = attention_mask.all(dim=-1)  # [b, 1, s]: rows with no visible key
        return context.masked_fill(blind.permute(2, 0, 1), 0.0)  # context is [s, b, h]
