"""Megatron-core on CPU: the few places where mcore 0.16 assumes CUDA, bridged explicitly.

Nothing here runs at import time. `enable_cpu_support()` is called by the runtime when the chosen
device is the CPU (from `from_pretrained`), and covers inference and training alike, so the model
trains under any trainer (transformers' Trainer, TRL's, MCoreTrainer); megatron's optimizer runs
inside `megatron_optimizer_device()`, a scoped torch function mode. The last three functions bridge
bugs of megatron's torch-optimizer fallback (no Transformer Engine / Apex, as on every CPU) in its
distributed-optimizer checkpoints. Each bridge names the mcore code it bridges. They were written
against megatron-core 0.16; another version logs a warning (they may still be right).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from transformers.utils import logging

logger = logging.get_logger(__name__)

WRITTEN_FOR_MCORE = "0.16"
_applied = False


class CpuRNGStatesTracker:
    """Stands in for `tensor_parallel.random.CudaRNGStatesTracker` with CPU generator states.

    mcore forks the 'model-parallel-rng' state in attention and in weight init even with dropout 0;
    the CUDA tracker calls `torch.cuda.get_rng_state`, which fails on a CPU-only torch.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def enable_cpu_support() -> None:
    """Make megatron-core's forward/backward paths run on a CPU-only torch. Idempotent."""
    global _applied
    if _applied:
        return
    import megatron.core
    from megatron.core.tensor_parallel import random as mcore_random

    version = getattr(megatron.core, "__version__", "unknown")
    if not str(version).startswith(WRITTEN_FOR_MCORE):
        logger.warning(
            f"CPU support was written for megatron-core {WRITTEN_FOR_MCORE}.x, found {version}; "
            "if a forward fails on CUDA calls, the bridges in mcore_transformers/runtime/cpu.py need updating."
        )

    # Bridges `device=torch.cuda.current_device()` in tensor_parallel/mappings.py (all-gather and
    # reduce-scatter buffers), tensor_parallel/layers.py, transformer/attention.py and
    # moe/router.py: on a CPU-only torch the call raises; CPU is the only device there is.
    if not torch.cuda.is_available():
        torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]

    # Bridges tensor_parallel/random.py: CudaRNGStatesTracker reads CUDA RNG state.
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # Bridges transformer/moe/moe_utils.py, which references `te_general_gemm` when TE is absent.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    bridge_missing_transformer_engine()
    _bridge_training_paths()
    _applied = True


def bridge_missing_transformer_engine() -> None:
    """Bridges transformer/multi_latent_attention.py when Transformer Engine is not installed. Idempotent.

    Its `from megatron.core.extensions.transformer_engine import TELinear, ...` succeeds without TE
    (that module substitutes a MagicMock for `transformer_engine`), so MLA sets HAVE_TE = True and
    its constructor's `isinstance(self.linear_proj, TELinear)` raises TypeError (TELinear is a mock
    instance, not a class). Without TE those names mean "no such class".
    """
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        return
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False
    for name in ("TELinear", "TEColumnParallelLinear", "set_save_original_input"):
        setattr(multi_latent_attention, name, None)


class _CudaLiteralOnCpu:
    """`torch` as seen by one mcore module, except that `torch.zeros(..., device="cuda")` lands on the CPU."""

    def __init__(self, torch_module):
        self._torch = torch_module

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def zeros(self, *args, device=None, **kwargs):
        if device == "cuda":
            device = "cpu"
        return self._torch.zeros(*args, device=device, **kwargs)


def _bridge_training_paths() -> None:
    """megatron-core's training paths (pipeline schedules, activation recompute) on a CPU-only torch."""
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random

    # Bridges pipeline_parallel/schedules.py: every forward_backward_* function counts tokens in
    # `torch.zeros([], dtype=torch.int, device="cuda")`.
    if not isinstance(schedules.torch, _CudaLiteralOnCpu):
        schedules.torch = _CudaLiteralOnCpu(torch)

    # Bridges pipeline_parallel/p2p_communication.py, which calls `torch.cuda.synchronize()` after
    # batched send/recv (`batch_p2p_sync`); on the CPU there is nothing to wait for.
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]

    # Bridges tensor_parallel/random.py CheckpointFunction (activation recompute: gradient checkpointing under
    # any trainer), which saves and restores the CUDA RNG state next to the CPU one; there is no CUDA RNG.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None


def _is_cuda(device) -> bool:
    return device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda") or (
        isinstance(device, str) and device.startswith("cuda:")
    )


class _MegatronOptimizerOnCpu(TorchFunctionMode):
    """While active, megatron-core's optimizer code runs on a CPU-only torch.

    Bridges optimizer/{optimizer,distrib_optimizer,clip_grads,grad_scaler}.py, which (0.16) allocate
    their flags, norms and loss scale with `device="cuda"` / `torch.cuda.current_device()`, move
    state with `.cuda()`, and accept parameters only if `param.type()` names a CUDA tensor type
    ("torch.cuda.FloatTensor", ...). Within the mode: a CUDA device argument means the CPU, `.cuda()`
    is the tensor itself, and `.type()` of a CPU tensor reads as its CUDA twin. Scoped to the
    optimizer's own calls (construction, step, state dicts), never global.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def megatron_optimizer_device():
    """Context for calls into megatron-core's optimizer: the CPU bridge above without CUDA, nothing with it."""
    return contextlib.nullcontext() if torch.cuda.is_available() else _MegatronOptimizerOnCpu()


_fallback_bridged = False


def bridge_torch_optimizer_checkpointing() -> None:
    """Bridges optimizer/distrib_optimizer.py when neither Transformer Engine nor Apex is installed. Idempotent.

    megatron then steps torch's AdamW, which keeps a per-parameter `step` in its state. Loading a
    "fully_reshardable" distributed-optimizer checkpoint restores that step from the saved param
    groups (load_state_dict, "non-Apex/TE support"), then copies each saved state tensor into the
    live one for every key of the live state, `step` included, which the checkpoint does not
    hold as a tensor: KeyError. The copy skips what the checkpoint does not have.
    """
    global _fallback_bridged
    from megatron.core.optimizer import distrib_optimizer

    if _fallback_bridged or getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return
    original = distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_saved_states(self, model_param, tensors):
        live = self._get_main_param_and_optimizer_states(model_param)
        return original(self, model_param, {**{k: v for k, v in live.items() if k not in tensors}, **tensors})

    distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states = set_saved_states
    _fallback_bridged = True


def fill_fresh_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Bridges optimizer/distrib_optimizer.py with torch's AdamW (no Transformer Engine / Apex): building the
    sharded state dict to *load* into reads the live state's per-parameter `step`, which torch's AdamW
    creates only at its first step. A fresh optimizer gets the state that first step would create
    (step 0, zero moments); loading then overwrites all of it."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def untie_adam_steps(optimizer: torch.optim.Optimizer) -> None:
    """Bridges optimizer/distrib_optimizer.py `load_state_dict` with torch's AdamW (no Transformer Engine /
    Apex): it restores `step` as *one* tensor shared by every parameter's state, and torch's foreach
    AdamW then adds 1 to it once per parameter at every step (wrong bias correction from the first
    step after a resume). Each parameter gets its own copy, as torch's optimizer keeps it."""
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
