"""Megatron-Core speed and parallelism behind the transformers API.

Heavy names (torch, megatron-core, transformers behind them) load on first use, so the command line
starts fast and launcher processes do not import the whole stack.
"""

import importlib

from .versions import warn_if_untested
from .tools.verify import VerificationError, VerifyReport, verify  # light: imports torch only when called

warn_if_untested()  # once, at import: a transformers / peft / megatron-core release outside the tested range

__version__ = "0.1.0"

_LAZY = {
    "MCoreModelForCausalLM": ".model.causal_lm",
    "MCoreModelForImageTextToText": ".multimodal.image_text",
    "ParallelConfig": ".runtime.parallel",
    "destroy_parallel_state": ".runtime.parallel",
    "MCoreTrainer": ".training",
    "TrainingError": ".training",
}
__all__ = [*_LAZY, "VerificationError", "VerifyReport", "verify"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
