"""Process groups and device: torch.distributed + Megatron parallel state, from torchrun or a world of one."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.distributed as dist
from transformers.utils import logging

from ..errors import LayoutError

logger = logging.get_logger(__name__)

DEFAULT_SEED = 1234
LAYOUT_ENV_PREFIX = "MCORE_TRANSFORMERS_"  # MCORE_TRANSFORMERS_TP=2 etc.: the layout of a script that names none


@dataclass(frozen=True)
class ParallelConfig:
    """The model-parallel layout a user asks for; dp is whatever the world leaves."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    sequence_parallel: bool = False

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name}={value!r}: parallel sizes must be positive integers.")
        if self.vpp is not None and (not isinstance(self.vpp, int) or self.vpp < 1):
            raise LayoutError(f"vpp={self.vpp!r}: must be a positive integer or None.")
        if self.vpp is not None and self.vpp > 1 and self.pp == 1:
            raise LayoutError(f"vpp={self.vpp} needs pipeline parallelism: set pp >= 2 (got pp=1).")
        if self.sequence_parallel and self.tp == 1:
            raise LayoutError("sequence_parallel=True needs tp >= 2 (got tp=1).")

    @property
    def virtual_stages(self) -> int:
        return self.vpp or 1

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def check_world(self, world_size: int) -> None:
        """Refuse layouts the world cannot hold, naming the numbers."""
        if world_size % self.model_parallel_size:
            raise LayoutError(
                f"tp·pp·cp = {self.tp}·{self.pp}·{self.cp} = {self.model_parallel_size} does not divide "
                f"the world size {world_size}. Launch with a multiple of {self.model_parallel_size} "
                f"processes (torchrun --nproc_per_node=N) or choose smaller sizes."
            )
        expert_tp = self.etp or self.tp
        expert_group = self.ep * expert_tp * self.pp
        if world_size % expert_group:
            raise LayoutError(
                f"ep·etp·pp = {self.ep}·{expert_tp}·{self.pp} = {expert_group} does not divide the "
                f"world size {world_size}."
            )

    @classmethod
    def with_environment(cls, **given) -> "ParallelConfig":
        """The layout from the arguments given, the others from MCORE_TRANSFORMERS_TP / _PP / _VPP / _CP / _EP /
        _ETP / _SEQUENCE_PARALLEL (so an unmodified transformers script runs sharded under torchrun), else 1."""
        values = {}
        for field in fields(cls):
            value = given.get(field.name)
            if value is None:
                text = os.environ.get(f"{LAYOUT_ENV_PREFIX}{field.name.upper()}")
                if text:
                    try:
                        value = text.strip().lower() in ("1", "true", "yes") if field.type == "bool" else int(text)
                    except ValueError:
                        raise LayoutError(
                            f"{LAYOUT_ENV_PREFIX}{field.name.upper()}={text!r} is not a number: set it to an integer."
                        ) from None
            if value is not None:
                values[field.name] = value
        return cls(**values)

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "ParallelConfig":
        """Pop the parallel kwargs (tp, pp, ...) out of from_pretrained's kwargs."""
        names = {f.name for f in fields(cls)}
        return cls(**{name: kwargs.pop(name) for name in list(kwargs) if name in names})


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def global_rank() -> int:
    """This process's rank in the world (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_rank0() -> bool:
    return global_rank() == 0


def several_processes() -> bool:
    """torch.distributed is up with more than one process (collectives have someone to talk to)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def broadcast_from_rank0(value):
    """Rank 0's `value` (any picklable object) on every rank; the value itself in a world of one."""
    if several_processes():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def barrier() -> None:
    """Wait for every process (nothing to wait for in a world of one)."""
    if several_processes():
        dist.barrier()


def init_distributed() -> None:
    """torch.distributed from torchrun's env vars, or a world of one; reused when already up."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(default_device())
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        # A world of one needs no rendezvous: an in-process store avoids picking a port.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def _current_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or None,
        "cp": ps.get_context_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
    }


def init_parallel_state(layout: ParallelConfig, seed: int = DEFAULT_SEED) -> None:
    """Megatron's parallel state for `layout`; reused when it matches, refused when it does not."""
    from megatron.core import parallel_state as ps

    init_distributed()
    layout.check_world(dist.get_world_size())
    if not torch.cuda.is_available():
        from .cpu import enable_cpu_support

        enable_cpu_support()

    wanted = {
        "tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp if (layout.vpp or 1) > 1 else None,
        "cp": layout.cp, "ep": layout.ep, "etp": layout.etp or layout.tp,
    }
    if ps.model_parallel_is_initialized():
        current = _current_layout()
        if current != wanted:
            raise LayoutError(
                f"Megatron parallel state is already initialised with {current}, but this model asks "
                f"for {wanted}. Use the same layout for every model in a process, or call "
                "mcore_transformers.runtime.destroy_parallel_state() first."
            )
        return
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=wanted["vpp"],
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    seed_parallel_rng(seed)


def seed_parallel_rng(seed: int) -> None:
    """Seed Megatron's named RNG streams (model-parallel, data-parallel, expert-parallel)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mcore_random

    if torch.cuda.is_available():
        mcore_random.model_parallel_cuda_manual_seed(seed)
        return
    # Same offsets as model_parallel_cuda_manual_seed, on the CPU tracker.
    tp_rank = ps.get_tensor_model_parallel_rank()
    tracker = mcore_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    expert_seed = seed + 1024 + 100 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank()
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, expert_seed)


def destroy_parallel_state() -> None:
    """Tear down Megatron's parallel state (torch.distributed stays up) so another layout can start."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
