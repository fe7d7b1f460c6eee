"""Elementwise changes at the two ends of the decoder stream that some families make and megatron-core's GPTModel
has no switch for: a factor on the embedding output (Gemma: sqrt(hidden_size); Granite), the LM logits divided by a
number (Granite) and a soft cap on them (Gemma 2: `cap · tanh(logits / cap)`); and a bias on the LM head (PhiMoE),
a parameter of the output layer rather than a hook.

The factor, divisor and cap are forward hooks put on this rank's chunks at build time, like the pad-row hook
(padding_row.py), so every path that runs the modules sees them: forward, generate, the training step, megatron's
pipeline schedule. Being elementwise, they apply to whatever part of the tensor a rank holds: a sequence-parallel slice
of the embedding output, a tensor-parallel shard of the vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch


def scale_embedding_output(chunks, multiplier: Optional[float]) -> None:
    """The first stage's embedding output times `multiplier`, the factor cast to the output's dtype first (transformers'
    scaled word embedding: `embedding(ids) * tensor(multiplier).to(dtype)`, so bf16 models multiply by the rounded factor)."""
    if multiplier is None:
        return
    for chunk in chunks:
        if chunk.pre_process:
            chunk.embedding.register_forward_hook(
                lambda module, args, output: output * torch.tensor(multiplier).to(output.dtype)
            )


def add_output_bias(chunks) -> None:
    """The last stage's LM head with a bias (PhiMoE's `lm_head_bias`; megatron's GPTModel builds its output layer
    without one): a parameter of the output layer itself, this rank's vocabulary rows (padded rows included), so its
    own forward adds it (`x·Wᵀ + bias`, as transformers' nn.Linear) wherever the logits are computed, before the hooks
    below, and the weight rules load and export it like the head's rows (`output_layer.bias`)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for chunk in chunks:
        if chunk.post_process:
            head = chunk.output_layer
            rows = head.output_size_per_partition
            bias = torch.nn.Parameter(torch.empty(rows, dtype=chunk.config.params_dtype, device="meta"))
            set_tensor_model_parallel_attributes(bias, True, 0, 1)
            head.bias = bias


def divide_logits(chunks, divisor: Optional[float]) -> None:
    """The last stage's logits (this rank's vocabulary shard) divided by `divisor`, in their dtype (Granite's
    `logits_scaling`: a division, as transformers does, not a product with the reciprocal)."""
    if divisor is None:
        return
    for chunk in chunks:
        if chunk.post_process:
            chunk.output_layer.register_forward_hook(lambda module, args, output: (output[0] / divisor, output[1]))


def softcap_logits(chunks, cap: Optional[float]) -> None:
    """The last stage's logits (this rank's vocabulary shard) soft-capped: `cap · tanh(logits / cap)`, in their dtype."""
    if cap is None:
        return
    for chunk in chunks:
        if chunk.post_process:
            chunk.output_layer.register_forward_hook(_softcap_hook(cap))


def _softcap_hook(cap: float):
    def hook(module, args, output):
        logits, bias = output
        return torch.tanh(logits / cap) * cap, bias

    return hook
