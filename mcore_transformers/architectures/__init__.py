"""One file per HF family: config translation and weight rules. Importing registers them."""

from . import llama, mistral, qwen2, qwen3  # noqa: F401  (registration)
from .base import ARCHITECTURES, DecoderArchitecture, get_architecture, register

__all__ = ["ARCHITECTURES", "DecoderArchitecture", "get_architecture", "register"]
