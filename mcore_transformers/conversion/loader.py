"""HF checkpoint → this rank's mcore parameters: validate everything first, then read only owned bytes."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CheckpointError
from .binding import BoundParam
from .reader import CheckpointReader
from .rules import ShardLayout


def expected_hf_shapes(bound: BoundParam, layout: ShardLayout) -> tuple[tuple[int, ...], ...]:
    """The HF shapes this parameter implies, found by exporting meta shards (no layout logic repeated)."""
    shard = torch.empty(bound.param.shape, dtype=bound.param.dtype, device="meta")
    shards = [shard] * (layout.tp_size if bound.rule.tp_dim is not None else 1)
    return tuple(tuple(t.shape) for t in bound.rule.export(shards, layout))


def check_checkpoint(bound: Sequence[BoundParam], reader: CheckpointReader, layout: ShardLayout) -> None:
    """Every tensor this rank needs is present with the shape the config implies; raise before reading."""
    missing, wrong = [], []
    for item in bound:
        for name, shape in zip(item.hf_names, expected_hf_shapes(item, layout)):
            if name not in reader:
                missing.append(name)
            elif reader.shape(name) != shape:
                wrong.append(f"{name}: checkpoint {list(reader.shape(name))}, config implies {list(shape)}")
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensors the config needs are missing from {reader.folder}: {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}. The checkpoint is incomplete or does not belong to this config."
        )
    if wrong:
        raise CheckpointError(
            f"{len(wrong)} tensors in {reader.folder} have shapes that do not match config.json: {wrong[:4]}. "
            "The weights and config.json come from different models."
        )


def load_parameters(
    bound: Sequence[BoundParam],
    reader: CheckpointReader,
    layout: ShardLayout,
    dtype: torch.dtype,
    device: torch.device,
    show_progress: bool = False,
) -> None:
    """Replace each meta parameter with its shard. Whole, same-dtype tensors stay zero-copy mappings."""
    for item in tqdm(bound, desc="Loading weights", disable=not show_progress, unit="tensor"):
        old = item.param
        tensor = item.rule.load(reader, item.hf_names, layout).to(device=device, dtype=dtype)
        if tuple(tensor.shape) != tuple(old.shape):
            raise CheckpointError(
                f"{item.hf_names} produced a shard of shape {list(tensor.shape)} for {item.rule.mcore}, "
                f"expected {list(old.shape)}."
            )
        new = nn.Parameter(tensor, requires_grad=old.requires_grad)
        new.__dict__.update(old.__dict__)  # mcore's tensor_model_parallel / partition_dim / shared flags
        item.module._parameters[item.attr] = new


def check_materialised(chunks: Sequence[nn.Module]) -> None:
    leftovers = [n for c in chunks for n, t in [*c.named_parameters(), *c.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"These tensors were never loaded: {leftovers[:8]} (no rule wrote them).")
