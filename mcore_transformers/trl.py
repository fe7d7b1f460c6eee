"""TRL's trainers on megatron-core models at any layout (tp, pp, dp, ep): swap the import, keep the script.

    from mcore_transformers.trl import SFTTrainer     # instead of: from trl import SFTTrainer

At tp = pp = 1 TRL's own trainers already run on `MCoreModelForCausalLM` (its fused LM head uses the model's
backbone and its trainable head). Under tp / pp every rank of a model needs the same batch and megatron's
pipeline schedule, which `MCoreTrainer` provides: these classes are TRL's trainers with MCoreTrainer's steps,
data sharding by data-parallel rank, optimizer and checkpoints. TRL prepares the data (chat templates,
completion-only labels, packing) exactly as it does for a transformers model; the loss is the causal-LM loss
TRL's SFT computes (masked tokens excluded), so per-step losses equal TRL's on the HF model.

TRL is an optional dependency, imported only here. At tp = pp = 1 TRL's own DPOTrainer and GRPOTrainer run on
the model (tested equal to TRL on the HF model); for tp / pp > 1 they are not provided yet: their losses need the
policy and reference log-probabilities of each micro-batch inside megatron's pipeline schedule.
"""

from __future__ import annotations

try:
    import trl
except ImportError as err:  # pragma: no cover - exercised by users without TRL
    raise ImportError("mcore_transformers.trl needs TRL: pip install trl") from err

from .training import MCoreTrainer

__all__ = ["SFTTrainer", "SFTConfig"]

SFTConfig = trl.SFTConfig


class SFTTrainer(MCoreTrainer, trl.SFTTrainer):
    """TRL's `SFTTrainer` whose steps run on megatron-core (MCoreTrainer): same arguments, any layout.

    Extra keyword arguments are MCoreTrainer's (`micro_batch_size`, `megatron_optimizer`,
    `distributed_optimizer`). Training logs the loss, grad norm and learning rate; TRL's token-level metrics
    (entropy, mean token accuracy) come from its fused LM head, which megatron's schedule does not run.
    """
