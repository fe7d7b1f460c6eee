"""Errors MCoreTrainer raises for inputs and arguments it cannot honour (what, why, how to fix)."""

from ..errors import TrainingError

__all__ = ["TrainingError"]
