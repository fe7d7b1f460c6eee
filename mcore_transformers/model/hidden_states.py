"""transformers' `output_hidden_states` on megatron-core chunks: what enters each decoder layer, then the final norm.

transformers returns `(embeddings, output of layer 1, ..., output of layer L-1, norm(output of layer L))`, each
`[batch, seq, hidden]`. Here forward hooks record the same tensors in megatron's `[seq, batch, hidden]` (the
input of every layer, and the final layernorm's output), with gradients, and lay them out as transformers does;
under sequence parallelism each is gathered over the sequence. Pipeline stages hold different layers, so this
needs the whole decoder on each rank (pp = 1).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..errors import MCoreTransformersError
from .forward import bare_chunk


@contextlib.contextmanager
def recording_hidden_states(chunks, pipeline_stages: int) -> Iterator[list[torch.Tensor]]:
    """Collects, during one forward, each decoder layer's input and the final norm's output ([s, b, h])."""
    if pipeline_stages > 1:
        raise MCoreTransformersError(
            "output_hidden_states needs every decoder layer on one rank, but this model is split over "
            f"pp={pipeline_stages} pipeline stages. Load it with pp=1 (tp / ep still apply)."
        )
    recorded: list[torch.Tensor] = []
    hooks = []
    for chunk in chunks:
        decoder = bare_chunk(chunk).decoder
        for layer in decoder.layers:
            hooks.append(layer.register_forward_pre_hook(lambda module, args, kwargs: recorded.append(
                kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]), with_kwargs=True))
        if getattr(decoder, "final_layernorm", None) is not None:
            hooks.append(decoder.final_layernorm.register_forward_hook(lambda module, args, output: recorded.append(output)))
    try:
        yield recorded
    finally:
        for hook in hooks:
            hook.remove()


def as_transformers_hidden_states(recorded: list[torch.Tensor], sequence_parallel: bool, seq: int) -> tuple[torch.Tensor, ...]:
    """megatron's recorded `[s, b, h]` tensors as transformers' tuple of `[b, s, h]` (padding for sp cut)."""
    states = []
    for hidden in recorded:
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden)
        states.append(hidden[:seq].transpose(0, 1))
    return tuple(states)


class Backbone(nn.Module):
    """transformers' backbone face of the model (`model.base_model`): the final hidden states, no LM head.

    TRL's fused LM head (SFTTrainer) runs the backbone, then multiplies its `last_hidden_state` by
    `get_output_embeddings().weight`. That weight is the trainable parameter only when one rank holds the whole
    vocabulary (tp = pp = 1); with the vocabulary split it would be a copy that no gradient reaches, so other
    layouts are refused here, before any step trains the head wrongly.
    """

    def __init__(self, model):
        super().__init__()
        self.__dict__["_model"] = model

    def forward(self, *args, **kwargs) -> BaseModelOutputWithPast:
        model = self._model
        if model.layout.tp > 1 or model.layout.pp > 1:
            raise MCoreTransformersError(
                f"model.base_model (the backbone without the LM head, which TRL's fused LM head uses) needs tp = pp = 1, "
                f"but this model runs at tp={model.layout.tp}, pp={model.layout.pp}: the LM head's weight is split "
                "across ranks. Train with the trainers of mcore_transformers.trl (or MCoreTrainer) instead."
            )
        kwargs.pop("use_cache", None)
        out = model(*args, output_hidden_states=True, logits_to_keep=1, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=out.hidden_states[-1], hidden_states=out.hidden_states)
