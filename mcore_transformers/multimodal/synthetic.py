"""A synthetic image for checking a vision-language checkpoint (`verify`): random pixels in the processor's
layout and the placeholder tokens that go with them, written into the first row of a text batch."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig


def add_synthetic_image(config: PretrainedConfig, batch: dict, seed: int) -> dict:
    """`batch` (input_ids, attention_mask, labels; row 0 unpadded) with one image of 2×4 merged patches placed
    after row 0's first token: vision start, the placeholders, vision end; labels -100 there."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    grid = torch.tensor([[1, 2 * merge, 4 * merge]])
    tokens = int(grid.prod()) // merge**2
    input_ids, labels = batch["input_ids"].clone(), batch["labels"].clone()
    if input_ids.shape[1] < tokens + 4:
        raise ValueError(f"seq_len={input_ids.shape[1]} is too short for a synthetic image: use seq_len >= {tokens + 4}.")
    span = [config.vision_start_token_id] + [config.image_token_id] * tokens + [config.vision_end_token_id]
    input_ids[0, 1 : 1 + len(span)] = torch.tensor(span)
    labels[0, 1 : 1 + len(span)] = -100
    types = (input_ids == config.image_token_id).int()
    patch = getattr(vision, "in_channels", 3) * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(grid.prod()), patch, generator=generator)
    return dict(batch, input_ids=input_ids, labels=labels, mm_token_type_ids=types, pixel_values=pixels,
                image_grid_thw=grid)
