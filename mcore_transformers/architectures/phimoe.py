"""PhiMoE (Phi-3.5-MoE): registered to be refused with the reason, not silently mis-routed.

Its router is SparseMixer (transformers' `sparsemixer`): the first expert is the best logit, weighted by a softmax over
only the logits within a relative threshold (`router_jitter_noise`) of it; the second is the best of the rest after
masking the first, weighted by its own masked softmax; training samples experts (Gumbel) and uses a Heun's-method
gradient estimator. megatron-core's routers weight the chosen experts by one softmax or sigmoid over all (or the top-k)
scores and have no such masks, so no setting of theirs reproduces its weights."""

from ..errors import UnsupportedModelError
from .base import MoEDecoder, register


@register
class PhiMoe(MoEDecoder):
    model_types = ("phimoe",)

    def transformer_config(self) -> dict:
        raise UnsupportedModelError(
            "phimoe routes with SparseMixer (masked per-expert softmaxes within router_jitter_noise of the best logit, "
            "Gumbel sampling while training): megatron-core's top-k routers weight experts by one softmax or sigmoid, "
            "so Phi-3.5-MoE cannot be loaded exactly."
        )
