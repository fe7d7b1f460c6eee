"""Where `from_pretrained`'s weights come from: an HF folder's safetensors, or a megatron-core distributed
checkpoint folder (written by `save_distributed_checkpoint` / `mcore-transformers convert`, or an MCoreTrainer
checkpoint with megatron's optimizer). Either way each rank reads only the bytes of its own shards."""

from __future__ import annotations

from typing import Optional

import torch
from transformers.utils import logging

from ..architectures import DecoderArchitecture
from ..architectures.base import TE_FUSED_NORM_NAMES
from ..conversion import distributed
from ..conversion.binding import BoundParam, bind_parameters
from ..conversion.loader import check_checkpoint, load_parameters, materialise_empty
from ..conversion.reader import CheckpointReader
from ..runtime.parallel import is_rank0

logger = logging.get_logger(__name__)


def load_weights(
    folder: str, arch: DecoderArchitecture, built, dtype: torch.dtype, device: torch.device, variant: Optional[str]
) -> list[BoundParam]:
    """Bind the built chunks to the architecture's rules and fill them from `folder`; returns the binding."""
    renames = TE_FUSED_NORM_NAMES if built.uses_transformer_engine else {}
    if distributed.is_distributed_checkpoint(folder) and not distributed.has_hf_weights(folder, variant):
        # The HF names the weights were converted from choose among a rule's layouts, so a save gives them back.
        bound = bind_parameters(built.chunks, arch.rules(), renames, available=distributed.saved_hf_names(folder))
        materialise_empty(bound, dtype, device)
        if is_rank0():
            logger.info(f"Loading weights from the megatron-core distributed checkpoint in {folder}.")
        distributed.load_chunks(
            folder, built.chunks, built.shard_layout,
            advice="Load it with the model (config.json) it was written from.",
        )
        return bound
    with CheckpointReader(folder, variant) as reader:
        # The checkpoint's names choose among a rule's layouts (per-expert or stacked experts).
        bound = bind_parameters(built.chunks, arch.rules(), renames, available=reader)
        check_checkpoint(bound, reader, built.shard_layout)
        load_parameters(
            bound, reader, built.shard_layout, dtype, device,
            show_progress=is_rank0() and logging.is_progress_bar_enabled(),
        )
    return bound


def checkpoint_tensor_names(folder: str, variant: Optional[str]) -> Optional[set[str]]:
    """The HF tensor names of the checkpoint in `folder` (for a distributed checkpoint: those it was converted
    from; None when it does not record them)."""
    if distributed.is_distributed_checkpoint(folder) and not distributed.has_hf_weights(folder, variant):
        return distributed.saved_hf_names(folder)
    with CheckpointReader(folder, variant) as reader:
        return set(reader.names())
