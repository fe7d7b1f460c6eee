"""Errors MCoreTrainer raises for inputs and arguments it cannot honour (what, why, how to fix)."""

from ..errors import MCoreTransformersError


class TrainingError(MCoreTransformersError):
    """A training argument, batch or checkpoint that the megatron-core backend cannot use as given."""
