"""TRL's trainers on megatron-core models at any layout (tp, pp, dp, ep): swap the import, keep the script.

    from mcore_transformers.trl import SFTTrainer     # instead of: from trl import SFTTrainer
    from mcore_transformers.trl import DPOTrainer     # instead of: from trl import DPOTrainer
    from mcore_transformers.trl import GRPOTrainer    # instead of: from trl import GRPOTrainer

At tp = pp = 1 TRL's own trainers already run on `MCoreModelForCausalLM` (its fused LM head uses the model's
backbone and its trainable head). Under tp / pp every rank of a model needs the same batch and megatron's
pipeline schedule, which `MCoreTrainer` provides: these classes are TRL's trainers with MCoreTrainer's steps,
data sharding by data-parallel rank, optimizer and checkpoints. TRL prepares the data (chat templates,
completion-only labels, packing, preference pairs, generations and rewards) exactly as it does for a transformers model.

- SFT: the loss is the causal-LM loss TRL's SFT computes (masked tokens excluded), run by MCoreTrainer's own step.
- DPO, GRPO: TRL's own `compute_loss` is the loss. It reads the model through TRL's fused LM head
  (`fused_lm_head=True`), which the model answers from its vocabulary shards on every rank; MCoreTrainer replays the
  loss's gradient through megatron's schedule (training/replay.py). A reference model is a second
  MCoreModelForCausalLM at the same layout, or the adapters disabled on a PEFT model, as in TRL.
- GRPO with `use_vllm=True, vllm_mode="colocate"`: TRL's own in-process vLLM engine generates; the weights TRL pushes
  into it before each generation go through `mcore_transformers.vllm.update_weights` (HF names, full tensors gathered
  over tp / pp, vLLM's in-place reload), not TRL's parameter loop, which would hand vLLM megatron's names and, under
  tp, shards (`_VLLMGenerationWithOurSync`, checked on TRL 1.16.0; use this GRPOTrainer at tp = 1 too). Under tp / pp
  rank 0's engine generates for the model and the completions are broadcast. One data-parallel replica only;
  `vllm_mode="server"` (TRL's own weight protocol to `trl vllm-serve`) is refused.

TRL is an optional dependency, imported only here (checked on TRL 1.16).
"""

from __future__ import annotations

try:
    import trl
except ImportError as err:  # pragma: no cover - exercised by users without TRL
    raise ImportError("mcore_transformers.trl needs TRL: pip install trl") from err

import inspect

import torch
from peft import PeftModel

from trl.generation.vllm_generation import VLLMGeneration

from .model.causal_lm import MCoreModelForCausalLM
from .runtime.parallel import broadcast_from_rank0, is_rank0, several_processes
from .training import MCoreTrainer, TrainingError
from .training.data import dp_size
from .vllm import update_weights

__all__ = ["SFTTrainer", "SFTConfig", "DPOTrainer", "DPOConfig", "GRPOTrainer", "GRPOConfig"]

SFTConfig = trl.SFTConfig
DPOConfig = trl.DPOConfig
GRPOConfig = trl.GRPOConfig


class SFTTrainer(MCoreTrainer, trl.SFTTrainer):
    """TRL's `SFTTrainer` whose steps run on megatron-core (MCoreTrainer): same arguments, any layout.

    Extra keyword arguments are MCoreTrainer's (`micro_batch_size`, `megatron_optimizer`,
    `distributed_optimizer`). Training logs the loss, grad norm and learning rate; TRL's token-level metrics
    (entropy, mean token accuracy) come from its fused LM head, which megatron's schedule does not run.
    """


class _TrainerOwnLoss(MCoreTrainer):
    """TRL's `compute_loss` replayed through megatron (MCoreTrainer.replays_compute_loss), with the model's own fused
    LM head in place of the one TRL patches on."""

    replays_compute_loss = True

    def __init__(self, *args, **kwargs):
        # TRL's positional order (DPOTrainer: model, ref_model, args, ...), passed on by name to MCoreTrainer
        trl_trainer = next(cls for cls in type(self).__mro__ if cls.__module__.startswith("trl."))
        bound = inspect.signature(trl_trainer.__init__).bind_partial(self, *args, **kwargs).arguments
        bound.pop("self")
        bound.update(bound.pop("kwargs", {}))
        super().__init__(**bound)
        # trl's add_fused_lm_head sets an instance `forward` that projects the backbone's hidden states through the
        # full LM head: on a sharded model the model's own forward computes those statistics (fused_lm_head=True).
        for model in (self.model, getattr(self, "ref_model", None)):
            base = model.get_base_model() if isinstance(model, PeftModel) else model
            if isinstance(base, MCoreModelForCausalLM):
                vars(base).pop("forward", None)
                base.fused_head_temperature = float(getattr(self, "temperature", 1.0))


class DPOTrainer(_TrainerOwnLoss, trl.DPOTrainer):
    """TRL's `DPOTrainer` whose steps run on megatron-core (MCoreTrainer): same arguments, any layout, every loss type
    and metric of TRL's (its own code computes them). `precompute_ref_log_probs` needs tp = pp = 1."""


class GRPOTrainer(_TrainerOwnLoss, trl.GRPOTrainer):
    """TRL's `GRPOTrainer` whose steps run on megatron-core (MCoreTrainer): completions come from the model's
    `generate` (collective over the model's ranks), or with `use_vllm=True, vllm_mode="colocate"` from TRL's
    in-process vLLM engine, into which the weights go through `mcore_transformers.vllm.update_weights`
    (`_VLLMGenerationWithOurSync`); the loss is TRL's own."""

    def __init__(self, *args, **kwargs):
        config = inspect.signature(trl.GRPOTrainer.__init__).bind_partial(self, *args, **kwargs).arguments.get("args")
        if config is not None and config.use_vllm:
            _check_vllm_mode(config)
        super().__init__(*args, **kwargs)
        if self.use_vllm:
            # TRL builds its VLLMGeneration (and the engine) inside its own __init__: the object is kept, only its
            # weight sync (and, under model parallelism, who generates) is ours.
            self.vllm_generation.__class__ = _VLLMGenerationWithOurSync
            self.vllm_generation.mcore = self._mcore


def _check_vllm_mode(config) -> None:
    if config.vllm_mode != "colocate":
        raise TrainingError(
            f"vllm_mode={config.vllm_mode!r}: TRL's server mode pushes weights through its own VLLMClient protocol "
            "(`trl vllm-serve`), which mcore_transformers' weight sync does not speak. Use vllm_mode='colocate' "
            "(TRL's engine in the trainer's process), or drive an engine yourself with "
            "mcore_transformers.vllm.update_weights / RemoteEngine."
        )
    if config.vllm_tensor_parallel_size != 1 or config.vllm_enable_sleep_mode:
        raise TrainingError(
            f"vllm_tensor_parallel_size={config.vllm_tensor_parallel_size}, vllm_enable_sleep_mode="
            f"{config.vllm_enable_sleep_mode}: not supported with megatron models. update_weights feeds one whole engine "
            "from global rank 0 (vLLM's tensor parallelism would spread it over the trainer's processes), and TRL "
            "re-pushes slept weights from inside generation, which only rank 0 runs here. Use the defaults (1, False)."
        )
    if dp_size() > 1:
        raise TrainingError(
            f"use_vllm with {dp_size()} data-parallel replicas: update_weights feeds the engine of global rank 0 only, "
            "so the other replicas' engines would generate from stale weights. Run one replica (world size = "
            "tp * pp * cp) or generate with the model's own `generate` (use_vllm=False)."
        )


class _VLLMGenerationWithOurSync(VLLMGeneration):
    """TRL's vLLM generation (checked on TRL 1.16.0) with the weight sync of `mcore_transformers.vllm`.

    TRL's `sync_weights` hands `model.named_parameters()` to vLLM's `load_weights`: on a megatron model those are
    megatron's names (`chunks.0.decoder.layers.0.self_attention.linear_qkv.weight`, which vLLM refuses even at
    tp = 1) and, under tp / pp, shards. `update_weights` sends what `save_pretrained` writes (HF names, full tensors
    gathered to global rank 0) into vLLM's in-place reload, by reference (the engine's worker is in this process).
    Under model parallelism TRL's colocate mode starts an engine on every process; rank 0's engine takes the weights
    and generates for the whole model, and its completions are broadcast (every rank of a model needs the same batch).
    """

    mcore: MCoreModelForCausalLM

    def sync_weights(self) -> None:
        engine = self.llm if is_rank0() else None
        merged = isinstance(self.model, PeftModel)
        if merged:  # as TRL does: vLLM serves the base weights with the adapters merged in
            self.model.merge_adapter()
        try:
            update_weights(self.mcore, engine, transport="direct")
        finally:
            if merged:
                self.model.unmerge_adapter()
        if engine is not None:
            engine.reset_prefix_cache()

    def generate(self, prompts, images, num_generations, profiler=None) -> tuple:
        if not several_processes():
            return super().generate(prompts, images, num_generations, profiler)
        result = super().generate(prompts, images, num_generations, profiler) if is_rank0() else None
        # The in-process engine samples from this process's torch generator, which TRL then uses to shuffle the batch:
        # every rank of the model goes on from rank 0's state, as if it had sampled too.
        result, rng_state = broadcast_from_rank0((result, torch.get_rng_state() if is_rank0() else None))
        torch.set_rng_state(rng_state)
        return result
