"""One file per HF family: config translation and weight rules. Importing registers them."""

from . import (  # noqa: F401  (registration)
    deepseek_v2,
    deepseek_v3,
    ernie4_5,
    ernie4_5_moe,
    gemma,
    glm4,
    glm4_moe,
    glm4_moe_lite,
    gpt_oss,
    granite,
    llama,
    minimax_m2,
    mistral,
    mixtral,
    olmo2,
    olmoe,
    phi3,
    phimoe,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    qwen_vl_text,
    smollm3,
)
from .base import ARCHITECTURES, DecoderArchitecture, get_architecture, register

__all__ = ["ARCHITECTURES", "DecoderArchitecture", "get_architecture", "register"]
