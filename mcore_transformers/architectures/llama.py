"""Llama (1, 2, 3.x): the reference decoder; llama3 rope scaling comes from the config's rope_parameters."""

from .base import DecoderArchitecture, register


@register
class Llama(DecoderArchitecture):
    model_types = ("llama",)
