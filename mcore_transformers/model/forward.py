"""One forward pass over this rank's mcore chunks: HF inputs in, full-vocabulary logits out.

We drive the GPTModel submodules ourselves (embedding → decoder → output layer) so that HF's
semantics hold exactly: rotary angles follow `position_ids`, and the attention mask carries
padding and sliding windows explicitly (mcore's own default mask is causal-only).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from .fast_layers import FORWARD_MEMO


@dataclass(frozen=True)
class StreamEdits:
    """What another modality adds to the decoder's stream for one forward (multimodal models): a function of the
    embedding output (this rank's part of it: [s or s/tp, b, h]), and per global layer index one applied to that
    layer's output."""

    after_embedding: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    after_layer: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class ForwardInputs:
    input_ids: torch.Tensor  # [b, s]
    attention_mask: torch.Tensor  # [b, 1, s, past + s] bool, True = masked out
    # [past + s, b, 1, rotary_dim] angles: the cached keys' positions, then these (one block of columns per rotary
    # table where layer types have their own, see MCoreModelForCausalLM.rotary_angles_for)
    rotary: torch.Tensor
    # megatron-core inference context holding this rank's KV cache (None: no cache). Attention writes
    # this step's keys/values at its `sequence_len_offset` and attends over everything cached so far.
    inference_context: Optional[Any] = None
    # Positions (along the sequence) whose logits are computed: a slice or a 1-D index tensor; None = all.
    keep: Union[slice, torch.Tensor, None] = None
    edits: StreamEdits = field(default_factory=StreamEdits)


def attention_mask_for(
    padding_mask: Optional[torch.Tensor], batch: int, seq: int, window: Optional[int], device: torch.device,
    past: int = 0, segments: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal (+ sliding window) mask combined with the HF padding mask; True = not attended.

    The queries are positions `past .. past + seq - 1` of the sequence, the keys `0 .. past + seq - 1`
    (`past` > 0 when earlier positions sit in a KV cache). `padding_mask` is HF's 2-D mask over all
    `past + seq` positions, 1 = real token. `segments` ([b, seq], no cache): packed sequences, a token
    attends only within its own (`packed_segments`).
    """
    query = torch.arange(past, past + seq, device=device)[:, None]
    key = torch.arange(past + seq, device=device)[None, :]
    masked = key > query
    if window is not None:
        masked = masked | (query - key >= window)
    masked = masked[None, None].expand(batch, 1, seq, past + seq)
    if padding_mask is not None:
        masked = masked | ~padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    if segments is not None:
        segments = segments.to(device)
        masked = masked | (segments[:, None, :, None] != segments[:, None, None, :])
    return masked


def packed_segments(position_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """transformers' rule for packed sequences (batches without an attention mask, e.g. TRL's padding-free
    packing): a position that does not follow its predecessor by one starts a new sequence. [b, s] sequence
    numbers, or None when every row holds one sequence."""
    if position_ids is None:
        return None
    diff = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    segments = (diff != 1).cumsum(-1)
    return None if bool((segments[:, -1] == 0).all()) else segments


def rotary_angles(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool = False, components: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """[b, s] positions → [s, b, 1, d] angles, computed in fp32 as transformers does: each frequency for both
    halves of the head (rotate_half), or for both elements of a pair when the rotary is interleaved (GLM style,
    megatron's `rotary_interleaved`).

    Multimodal rotary (`components`, the architecture's `rotary_components()`): `[3, b, s]` positions (temporal,
    height, width), frequency f rotated by component `components[f]`, as transformers' M-RoPE recomposes them.
    """
    if components is not None and position_ids.dim() == 2:
        position_ids = position_ids.expand(3, *position_ids.shape)
    freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)
    if components is not None:
        index = components.to(freqs.device).view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
        freqs = freqs.gather(0, index)[0]
    angles = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return angles.transpose(0, 1).unsqueeze(2)


def bare_chunk(module: torch.nn.Module) -> GPTModel:
    """The GPTModel chunk under its wrappers (megatron DDP while training)."""
    while hasattr(module, "module"):
        module = module.module
    return module


@contextlib.contextmanager
def _layer_outputs_edited(chunk: GPTModel, edits: Mapping[int, Callable[[torch.Tensor], torch.Tensor]]):
    """`edits[i]` applied to the hidden states global layer i of this chunk returns (forward hooks, removed after)."""
    hooks = []
    for layer in chunk.decoder.layers:
        edit = edits.get(layer.layer_number - 1)
        if edit is not None:
            hooks.append(layer.register_forward_hook(lambda module, args, output, edit=edit: (edit(output[0]), *output[1:])))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def run_chunk(chunk: GPTModel, inputs: ForwardInputs, hidden: Optional[torch.Tensor]) -> torch.Tensor:
    """Embedding (first chunk), decoder layers, then the local logits shard (last chunk)."""
    if chunk.pre_process:
        hidden = chunk.embedding(input_ids=inputs.input_ids, position_ids=None)
        if inputs.edits.after_embedding is not None:
            hidden = inputs.edits.after_embedding(hidden)
    else:
        chunk.decoder.set_input_tensor(hidden)
        hidden = None
    with _layer_outputs_edited(chunk, inputs.edits.after_layer):
        hidden = chunk.decoder(
            hidden_states=hidden,
            attention_mask=inputs.attention_mask,
            rotary_pos_emb=inputs.rotary,
            inference_context=inputs.inference_context,
        )
    if not chunk.post_process:
        return hidden
    if inputs.keep is not None:
        hidden = hidden[inputs.keep]  # [s, b, h] → [kept, b, h]: logits only where they are wanted
    weight = chunk.shared_embedding_or_output_weight() if chunk.share_embeddings_and_output_weights else None
    logits, _ = chunk.output_layer(hidden, weight=weight)
    return logits


def _pipeline_neighbours() -> tuple[list[int], int, int]:
    group = ps.get_pipeline_model_parallel_group()
    return dist.get_process_group_ranks(group), ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()


def forward_logits(
    chunks: Sequence[GPTModel], inputs: ForwardInputs, hidden_shape, dtype, gather_vocabulary: bool = True
) -> Optional[torch.Tensor]:
    """Full padded-vocab logits [s, b, V_pad] on the last pipeline stage (None elsewhere); this rank's vocabulary
    shard [s, b, V_pad / tp] without `gather_vocabulary`.

    Stages run one after another, virtual stages interleaved as megatron orders them: chunk v of
    pipeline rank r feeds chunk v of rank r+1, and the last rank's chunk v feeds chunk v+1 of rank 0.
    """
    ranks, pp_rank, pp_size = _pipeline_neighbours()
    stages = len(chunks)
    hidden = None
    logits = None
    for virtual in range(stages):
        for stage in range(pp_size):
            if stage != pp_rank:
                continue
            first = virtual == 0 and stage == 0
            last = virtual == stages - 1 and stage == pp_size - 1
            if not first:
                hidden = torch.empty(hidden_shape, dtype=dtype, device=inputs.input_ids.device)
                dist.recv(hidden, src=ranks[(stage - 1) % pp_size])
            out = run_chunk(chunks[virtual], inputs, hidden)
            if last:
                logits = out
            else:
                dist.send(out.detach().contiguous(), dst=ranks[(stage + 1) % pp_size])
    FORWARD_MEMO.clear()  # what the layers derived from this forward's mask and angles
    if logits is None or not gather_vocabulary:
        return logits
    return gather_from_tensor_model_parallel_region(logits)


def broadcast_from_last_stage(tensor: Optional[torch.Tensor], shape, dtype, device) -> torch.Tensor:
    """The last pipeline stage's tensor, on every stage."""
    ranks, pp_rank, pp_size = _pipeline_neighbours()
    if pp_size == 1:
        return tensor
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    tensor = tensor.contiguous()
    dist.broadcast(tensor, src=ranks[-1], group=ps.get_pipeline_model_parallel_group())
    return tensor
