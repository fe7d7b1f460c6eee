"""The vision tower: transformers' own module, held whole by the ranks of the first pipeline stage.

It is built from the checkpoint's `vision_config` with transformers' `AutoModel.from_config` (parameters on the
meta device until the checkpoint fills them, buffers real), attached to the first model chunk as `vision_model`,
and its weights are replicated rules like any norm's: the same bytes on every tensor-parallel rank, exported by
the first. What it returns (merged patch features and, for Qwen3-VL, the deepstack features of some of its
layers) replaces the placeholder tokens' embeddings before the decoder, and is added to the output of the first
decoder layers (`StreamEdits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from torch import nn
from transformers import AutoModel, PretrainedConfig

from ..conversion.rules import Replicated, Rule
from ..model.forward import StreamEdits

VISION_MODULE = "vision_model"  # the tower's name inside the first chunk (megatron-side parameter names)


def build_vision_tower(vision_config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """transformers' vision module for `vision_config`: parameters on the meta device, buffers computed."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return AutoModel.from_config(vision_config, dtype=dtype)


def vision_rules(tower: nn.Module, hf_prefix: str) -> list[Rule]:
    """One replicated rule per parameter (and persistent buffer) of the tower: `vision_model.X` ⇄ `{hf_prefix}X`."""
    names = [name for name, _ in tower.named_parameters()]
    names += [
        f"{module_name}.{name}" if module_name else name
        for module_name, module in tower.named_modules()
        for name, buffer in module.named_buffers(recurse=False)
        if buffer is not None and name not in module._non_persistent_buffers_set
    ]
    return [Replicated(f"{VISION_MODULE}.{name}", hf_prefix + name) for name in names]


@dataclass
class MediaFeatures:
    """The tower's output for one kind of media (images or videos) of a batch."""

    embeds: torch.Tensor  # [placeholder tokens, hidden]
    deepstack: list[torch.Tensor] = field(default_factory=list)  # per decoder layer, [placeholder tokens, hidden]


def encode(tower: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> MediaFeatures:
    """Run the tower as transformers' `get_image_features` / `get_video_features` do."""
    output = tower(pixel_values.type(tower.dtype), grid_thw=grid_thw, return_dict=True)
    return MediaFeatures(output.pooler_output, list(getattr(output, "deepstack_features", None) or []))


def _dense(values: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[s, b, h]` zeros with `values` at the True places of `mask` ([b, s]), filled in transformers'
    `masked_scatter` order (row by row)."""
    batch, seq = mask.shape
    dense = values.new_zeros(batch, seq, values.shape[-1], dtype=dtype)
    dense[mask] = values.to(dtype)
    return dense.transpose(0, 1)


def _rows_of_this_rank(full: torch.Tensor, rows: int) -> torch.Tensor:
    """This rank's part of a `[s, ...]` tensor: all of it, or its sequence-parallel slice of `rows` rows."""
    if rows == full.shape[0]:
        return full
    start = ps.get_tensor_model_parallel_rank() * rows
    return full[start : start + rows]


def stream_edits(
    media: list[tuple[torch.Tensor, MediaFeatures]], padded_seq: int, first_layer: int = 0
) -> StreamEdits:
    """Placeholder embeddings replaced by the media features, deepstack features added after the first layers.

    `media`: (placeholder mask [b, s], features) per kind of media present. Both edits take this rank's part of
    the stream (the whole sequence, or its sequence-parallel slice) and work on dense `[s, b, h]` tensors, so the
    values are exactly transformers' (x + 0 = x where no feature lands).
    """
    if not media:
        return StreamEdits()
    masks = [nn.functional.pad(mask, (0, padded_seq - mask.shape[1])) for mask, _ in media]
    any_media = torch.stack(masks).any(0).transpose(0, 1)[..., None]  # [s, b, 1]

    def after_embedding(hidden: torch.Tensor) -> torch.Tensor:
        inserted = sum(_dense(features.embeds, mask, hidden.dtype) for mask, (_, features) in zip(masks, media))
        rows = hidden.shape[0]
        return torch.where(_rows_of_this_rank(any_media, rows), _rows_of_this_rank(inserted, rows), hidden)

    def deepstack_adder(level: int):
        def add(hidden: torch.Tensor) -> torch.Tensor:
            extra = sum(
                _dense(features.deepstack[level], mask, hidden.dtype) for mask, (_, features) in zip(masks, media)
            )
            return hidden + _rows_of_this_rank(extra, hidden.shape[0])

        return add

    levels = min(len(features.deepstack) for _, features in media)
    return StreamEdits(after_embedding, {first_layer + level: deepstack_adder(level) for level in range(levels)})


def count_features(grid_thw: Optional[torch.Tensor], spatial_merge_size: int) -> int:
    """Placeholder tokens the tower's output fills for these grids (merged patches)."""
    if grid_thw is None:
        return 0
    return int(grid_thw.prod(-1).sum()) // spatial_merge_size**2
