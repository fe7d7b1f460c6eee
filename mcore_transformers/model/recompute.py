"""transformers' activation checkpointing switches → megatron-core's full-layer recompute."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import TrainingError

if TYPE_CHECKING:
    from .causal_lm import MCoreModelForCausalLM


def enable_recompute(model: MCoreModelForCausalLM, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                     offload: bool = False) -> None:
    """transformers' activation checkpointing → megatron's full-layer recompute.

    every_n_layers=1 recomputes every layer ("uniform", one layer per checkpoint); n > 1 recomputes
    the first 1/n of each chunk's layers ("block"), the same share of layers. `offload` is not supported.
    """
    if offload:
        raise TrainingError("activation_checkpointing offload=True is not supported by MCoreTrainer.")
    config = model.chunks[0].config
    layers = len(model.chunks[0].decoder.layers)
    config.recompute_granularity = "full"
    if every_n_layers <= 1:
        config.recompute_method, config.recompute_num_layers = "uniform", 1
    else:
        config.recompute_method = "block"
        config.recompute_num_layers = max(1, -(-layers // every_n_layers))


def disable_recompute(model: MCoreModelForCausalLM) -> None:
    model.chunks[0].config.recompute_granularity = None


def recompute_enabled(model: MCoreModelForCausalLM) -> bool:
    return model.chunks[0].config.recompute_granularity is not None
