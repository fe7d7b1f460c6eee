"""Vision-language models: transformers' vision towers in front of megatron-core language models.

`families.py` declares the supported families, `positions.py` computes multimodal rotary positions,
`vision.py` holds the tower and what it adds to the decoder's stream, `image_text.py` is the model class.
"""

from .families import FAMILIES

__all__ = ["FAMILIES"]
