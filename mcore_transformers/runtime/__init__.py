"""Process groups, device and CPU support for megatron-core."""

from .parallel import ParallelConfig, destroy_parallel_state, init_parallel_state

__all__ = ["ParallelConfig", "destroy_parallel_state", "init_parallel_state"]
