"""The error LoRA support raises for bad adapters and unsupported options."""

from ..errors import AdapterError

__all__ = ["AdapterError"]
