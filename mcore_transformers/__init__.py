"""Megatron-Core speed and parallelism behind the transformers API."""

from .modeling import MCoreModelForCausalLM
from .runtime.parallel import ParallelConfig, destroy_parallel_state

__all__ = ["MCoreModelForCausalLM", "ParallelConfig", "destroy_parallel_state"]
__version__ = "0.1.0"
