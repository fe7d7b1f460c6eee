"""The pad token's embedding row learns nothing from lookups, as in transformers.

transformers builds every decoder's input embedding with `nn.Embedding(..., padding_idx=config.pad_token_id)`, so
a lookup of the pad token sends no gradient to its row (a tied LM head still does). A forward hook on the first
stage's word embeddings gives megatron's embedding the same rule: the outputs at pad tokens are detached. Where
the pad id is also a real token (Phi-3's <|endoftext|> is its eos) this is what keeps training equal to
transformers'.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state as ps


def freeze_pad_row_lookups(chunks, pad_token_id: Optional[int], vocab_size: int, sequence_parallel: bool) -> None:
    if not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab_size:
        return  # no padding_idx in transformers' embedding either
    for chunk in chunks:
        if chunk.pre_process:
            chunk.embedding.word_embeddings.register_forward_hook(_detach_pad_rows(pad_token_id, sequence_parallel))


def _detach_pad_rows(pad_token_id: int, sequence_parallel: bool):
    def hook(module, args, output: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return output
        pad = args[0] == pad_token_id  # [b, s]
        if sequence_parallel:  # the output is this rank's slice of the sequence, [s / tp, b, h]
            pad = pad.transpose(0, 1).chunk(ps.get_tensor_model_parallel_world_size(), 0)[
                ps.get_tensor_model_parallel_rank()]
        return torch.where(pad.unsqueeze(-1), output.detach(), output)

    return hook
