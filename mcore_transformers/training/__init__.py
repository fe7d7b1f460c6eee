"""Training sharded models with transformers' Trainer: MCoreTrainer and its pieces."""

from .errors import TrainingError
from .trainer import MCoreTrainer

__all__ = ["MCoreTrainer", "TrainingError"]
