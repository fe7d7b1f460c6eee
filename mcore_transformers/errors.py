"""User-facing errors: each message says what is wrong, why, and how to fix it."""


class MCoreTransformersError(ValueError):
    """Base class for input errors raised by mcore_transformers."""


class CheckpointError(MCoreTransformersError):
    """The checkpoint on disk is missing, truncated, or does not match the config."""


class UnsupportedModelError(MCoreTransformersError):
    """The HF model family or one of its config options has no mcore mapping."""


class LayoutError(MCoreTransformersError):
    """The requested parallel layout does not fit the model or the world."""


class SaveTargetError(MCoreTransformersError):
    """The save destination cannot be written safely."""


class AdapterError(MCoreTransformersError):
    """A LoRA adapter or config that cannot run on (or be loaded into) this megatron-core model."""


class GenerationError(MCoreTransformersError):
    """generate() was asked for something this model or its KV cache cannot do; the message says how to fix it."""


class TrainingError(MCoreTransformersError):
    """A training argument, batch or checkpoint that the megatron-core backend cannot use as given."""
