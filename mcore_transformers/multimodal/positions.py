"""Multimodal rotary positions (M-RoPE): three position components per token, as transformers computes them.

Text tokens advance all three components together; the tokens of an image or video take the temporal, height
and width index of their patch in the (merged) grid, offset by the position the media starts at, and the text
after it continues from the largest of those plus one. These are the semantics of transformers'
`Qwen2_5_VLModel.get_rope_index` / `Qwen3VLModel.get_rope_index` (5.19 to 5.24, identical there), written
against the inputs alone so that the model does not hold a transformers language model to ask.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


@dataclass(frozen=True)
class PositionRules:
    """How a family lays out the positions of a video's frames."""

    spatial_merge_size: int
    # Qwen2.5-VL: a video's temporal index advances by tokens_per_second · seconds per grid step (None: by one).
    tokens_per_second: Optional[float] = None
    # Qwen3-VL: each frame of a video is its own block (timestamps in text separate the frames).
    frames_apart: bool = False


def token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """transformers' `mm_token_type_ids` (0 text, 1 image, 2 video) from the placeholder tokens."""
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == image_token_id] = IMAGE
    types[input_ids == video_token_id] = VIDEO
    return types


def _media_positions(start: int, grid: torch.Tensor, merge: int, time_interval: float) -> torch.Tensor:
    frames, height, width = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    temporal = (torch.arange(frames) * time_interval).long()
    rows, cols = torch.arange(height) + start, torch.arange(width) + start
    t, h, w = torch.meshgrid(temporal, rows, cols, indexing="ij")
    positions = torch.stack([t, h, w]).reshape(3, -1)
    positions[0] += start  # after the time interval scaled the temporal index
    return positions


def rope_positions(
    input_ids: torch.Tensor,
    types: torch.Tensor,
    rules: PositionRules,
    image_grid_thw: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
    second_per_grid_ts: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[3, b, s]` positions of a batch of prompts and `[b, 1]` deltas (last position + 1 - real tokens: what
    positions of later tokens add to their plain index). Padding (attention_mask 0) gets position 0."""
    if video_grid_thw is not None and rules.frames_apart:
        video_grid_thw = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
        video_grid_thw[:, 0] = 1
    grids = {
        IMAGE: iter(image_grid_thw.cpu()) if image_grid_thw is not None else iter(()),
        VIDEO: iter(video_grid_thw.cpu()) if video_grid_thw is not None else iter(()),
    }
    seconds = iter(second_per_grid_ts.tolist()) if second_per_grid_ts is not None else itertools.repeat(1)
    batch, seq = input_ids.shape
    positions = torch.zeros(3, batch, seq, dtype=input_ids.dtype)
    deltas = []
    for row in range(batch):
        row_types = types[row].cpu()
        real = attention_mask[row].cpu().bool() if attention_mask is not None else torch.ones(seq, dtype=torch.bool)
        row_types = row_types[real]
        pieces, current = [], 0
        for kind, run in itertools.groupby(row_types.tolist()):
            length = len(list(run))
            if kind == TEXT:
                pieces.append(torch.arange(length).view(1, -1).expand(3, -1) + current)
                current += length
                continue
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(
                    f"Row {row} has more {'image' if kind == IMAGE else 'video'} placeholder runs than "
                    f"{'image_grid_thw' if kind == IMAGE else 'video_grid_thw'} has grids."
                )
            interval = 1.0
            if kind == VIDEO and rules.tokens_per_second is not None:
                interval = rules.tokens_per_second * next(seconds)
            block = _media_positions(current, grid, rules.spatial_merge_size, interval)
            if block.shape[1] != length:
                raise ValueError(
                    f"Row {row} has a run of {length} {'image' if kind == IMAGE else 'video'} placeholder tokens where "
                    f"its grid {tuple(int(x) for x in grid)} gives {block.shape[1]} merged patches"
                    f"{' (Qwen3-VL writes each video frame as its own block)' if rules.frames_apart else ''}. "
                    "Build the prompt with the model's processor."
                )
            pieces.append(block)
            current += max(int(grid[1]), int(grid[2])) // rules.spatial_merge_size
        row_positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        positions[:, row, real] = row_positions.to(positions.dtype)
        deltas.append((int(row_positions.max()) + 1 if row_positions.numel() else 0) - int(real.sum()))
    device = input_ids.device
    return positions.to(device), torch.tensor(deltas, device=device).unsqueeze(1)


def text_positions(
    batch: int, seq: int, past: int, attention_mask: Optional[torch.Tensor], deltas: Optional[torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """`[3, b, s]` positions of text tokens after `past` cached ones: their index (transformers' `cumsum(mask) - 1`
    when a mask covers the cached tokens and these), plus the prompt's delta when it held images or videos."""
    if attention_mask is not None and past > 0:
        plain = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, past:]
    else:
        plain = torch.arange(past, past + seq, device=device).expand(batch, seq)
    if deltas is not None:
        plain = plain + deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)
    return plain.to(device).unsqueeze(0).expand(3, batch, seq)
