"""Vision-language families: what each adds around its language model (a text family of `architectures/`).

A family names its checkpoint's key layout, how its video frames take positions, and whether its vision tower
feeds deepstack features; the language model, the vision tower and the engine are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from transformers import PretrainedConfig

from ..architectures import DecoderArchitecture, get_architecture
from ..conversion.rules import Rule
from ..errors import UnsupportedModelError
from .positions import PositionRules

# transformers 5's modules nest the language model and the tower under `model.`, and Qwen3-VL's files do too;
# Qwen2.5-VL's files keep transformers 4's layout (language model at `model.*`, tower at `visual.*`), which
# transformers 5 still writes for it. Both are read; a model saves back the layout it was loaded from.
NESTED = "model.language_model."
NESTED_VISUAL, FLAT_VISUAL = "model.visual.", "visual."


@dataclass(frozen=True)
class VisionLanguageFamily:
    model_types: tuple[str, ...]
    frames_apart: bool = False  # Qwen3-VL: every video frame is its own block of positions
    video_seconds: bool = False  # Qwen2.5-VL: video temporal positions step by tokens_per_second · seconds
    deepstack: bool = False  # Qwen3-VL: features of some tower layers are added after the first decoder layers

    def position_rules(self, config: PretrainedConfig) -> PositionRules:
        vision = config.vision_config
        return PositionRules(
            spatial_merge_size=vision.spatial_merge_size,
            tokens_per_second=getattr(vision, "tokens_per_second", None) if self.video_seconds else None,
            frames_apart=self.frames_apart,
        )

    def deepstack_layers(self, config: PretrainedConfig) -> int:
        """How many decoder layers (the first ones) receive deepstack features."""
        return len(getattr(config.vision_config, "deepstack_visual_indexes", None) or []) if self.deepstack else 0


FAMILIES: dict[str, VisionLanguageFamily] = {}


def _register(family: VisionLanguageFamily) -> None:
    for model_type in family.model_types:
        FAMILIES[model_type] = family


_register(VisionLanguageFamily(("qwen2_5_vl",), video_seconds=True))
_register(VisionLanguageFamily(("qwen3_vl", "qwen3_vl_moe"), frames_apart=True, deepstack=True))


def get_family(config: PretrainedConfig) -> VisionLanguageFamily:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported vision-language model. Supported: "
            f"{', '.join(sorted(FAMILIES))}. Text-only checkpoints load with MCoreModelForCausalLM."
        )
    return FAMILIES[model_type]


class VisionLanguageArchitecture:
    """The language model's architecture (every question of the engine goes to it) plus the tower's rules."""

    def __init__(self, text: DecoderArchitecture, tower_rules: list[Rule], config: PretrainedConfig):
        self.text = text
        self.tower_rules = tower_rules
        self.config = config  # the whole vision-language config (`hf` is the language model's)

    def rules(self) -> list[Rule]:
        return self.text.rules() + self.tower_rules

    def module_path(self, tensor_path: str) -> str:
        """transformers 5's modules nest the language model whatever layout the files keep."""
        if tensor_path.startswith("model.") and not tensor_path.startswith((NESTED, NESTED_VISUAL)):
            return NESTED + tensor_path[len("model."):]
        if tensor_path.startswith(FLAT_VISUAL):
            return NESTED_VISUAL + tensor_path[len(FLAT_VISUAL):]
        return tensor_path

    def __getattr__(self, name: str):
        return getattr(self.text, name)


def language_architecture(config: PretrainedConfig, nested: bool) -> DecoderArchitecture:
    """The language model's architecture under the checkpoint's names (`nested`: transformers 5's layout)."""
    rename = (lambda name: NESTED + name[len("model."):] if name.startswith("model.") else name) if nested else None
    tied = getattr(config, "tie_word_embeddings", None)
    return get_architecture(
        config.text_config, hf_rename=rename, tie_word_embeddings=None if tied is None else bool(tied)
    )


def checkpoint_is_nested(names: Optional[set[str]]) -> bool:
    """Whether a checkpoint's tensor names follow transformers 5's nesting (None: unknown, take transformers 5's)."""
    if names is None:
        return True
    return any(name.startswith(NESTED) for name in names) or not any(name.startswith("model.") for name in names)
