"""MCoreTrainer: transformers' Trainer for an MCoreModelForCausalLM laid out over tp / pp / vpp / ep / dp.

transformers' training loop runs unchanged (epochs, accumulation, logging, evaluation, callbacks,
checkpoint rotation, resumption). What its defaults get wrong for a sharded model is replaced through
the narrowest hooks:

  model wrapping     megatron-core DistributedDataParallel per chunk (grad buffers, DP reduce over the
                     data-parallel group only), never torch DDP over the whole world    `_wrap_model`
  forward/backward   megatron's pipeline schedule over micro-batches (1F1B / interleaved; a plain loop
                     at pp=1), loss = sum of token losses / tokens of the optimizer step  `training_step`
  token count        valid labels over the step's batches and data-parallel replicas   `_get_num_items_in_batch`
  optimizer          megatron-core's (optionally distributed) optimizer configured from transformers' optim,
                     lr, weight decay, betas and driven by its scheduler; fp32 masters for bf16/fp16 and
                     dynamic fp16 loss scaling. Optimizers megatron lacks (and PEFT adapters) step as
                     transformers' torch optimizer on the reduced grad buffers          `create_optimizer`
  MoE aux loss       transformers' load-balancing loss when config.output_router_logits  `_router_aux_loss`
  gradient norm      global over shards: TP shards once each, replicated params once   `_clip_grad_norm`
  data               sharded by data-parallel rank; every TP/PP rank of a replica sees the same batch
  evaluation         the same schedule (loss only) or the model's forward (logits), gathered over DP
  checkpoints        HF folder (full model, loadable by transformers) + megatron-core dist_checkpointing
                     state (model, optimizer; resharded on load) + RNG              checkpoint.py
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import _is_peft_model
from transformers.utils import logging

from ..model.causal_lm import MCoreModelForCausalLM
from ..runtime.parallel import barrier
from . import checkpoint as ckpt
from . import optimizer as megatron_optimizer
from .arguments import check_arguments, choose_optimizer, find_mcore_model
from .data import (
    check_replica_agrees,
    data_parallel_loaders,
    dp_size,
    gather_over_data_parallel,
    truncate_to,
)
from .errors import TrainingError
from .grads import (
    EvalModule,
    ModelParallelGradScaler,
    ShardedGrads,
    TrainingModule,
    mark_tensor_parallel_weights,
    swap_optimizer_params,
    wrap_chunks,
)
from .kv_copies import KVHeadCopies
from .replay import Recorder, check_replayable, replay
from .step import IGNORE_INDEX, PipelineStep, count_valid_targets, router_aux_loss_for, shifted_targets

logger = logging.get_logger(__name__)

MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids")


def _model_parallel_size() -> int:
    return ps.get_model_parallel_group().size() if dist.is_initialized() else 1


class MCoreTrainer(Trainer):
    """`transformers.Trainer` for `MCoreModelForCausalLM` under any tp / pp / vpp / ep and data parallelism.

    Use it as `Trainer` (same arguments, same logs): `per_device_train_batch_size` is per data-parallel
    replica, so the global batch is that × dp × gradient_accumulation_steps, dp = world / (tp·pp).

    micro_batch_size: rows per pipeline micro-batch. Each per-device batch is cut into
        per_device_batch / micro_batch_size micro-batches that megatron's schedule pipelines. Default:
        1 under pipeline parallelism, the whole per-device batch otherwise.
    megatron_optimizer: step with megatron-core's optimizer (True), transformers' torch optimizer on
        megatron's grad buffers (False), or the former whenever megatron has the chosen `optim` (None:
        adamw_torch / adamw_torch_fused / adamw_apex_fused / sgd, full-model training).
    distributed_optimizer: shard the optimizer state and fp32 masters over data-parallel ranks
        (megatron's distributed optimizer; needs megatron_optimizer).
    """

    def __init__(self, model=None, args=None, *trainer_args, micro_batch_size: Optional[int] = None,
                 megatron_optimizer: Optional[bool] = None, distributed_optimizer: bool = False, **kwargs):
        if model is None:
            raise TrainingError(
                "MCoreTrainer needs `model` (an MCoreModelForCausalLM); `model_init` is not supported because "
                "the model's layout is decided when it is loaded."
            )
        mcore = find_mcore_model(model)
        self._mcore = mcore
        self._training_module: Optional[TrainingModule] = None
        self._unscaled = False  # fp16: this step's gradients already divided by the loss scale
        self._grads: Optional[ShardedGrads] = None  # the torch-optimizer path's gradient bookkeeping
        self._megatron_optimizer: Optional[megatron_optimizer.MegatronOptimizerForTrainer] = None
        if trainer_args:
            super().__init__(model, args, *trainer_args, **kwargs)
        else:  # by name: TRL's trainers take other arguments second (DPOTrainer's ref_model)
            super().__init__(model, args=args, **kwargs)
        check_arguments(self.args, self.compute_loss_func)
        self.uses_megatron_optimizer = choose_optimizer(
            self.args, self.model, mcore, megatron_optimizer, distributed_optimizer, given=self.optimizer is not None
        )
        self.distributed_optimizer = distributed_optimizer
        pp = mcore.layout.pp
        if micro_batch_size is None:
            micro_batch_size = 1 if pp > 1 else self.args.per_device_train_batch_size
        if micro_batch_size < 1 or self.args.per_device_train_batch_size % micro_batch_size:
            raise TrainingError(
                f"micro_batch_size={micro_batch_size} must divide per_device_train_batch_size="
                f"{self.args.per_device_train_batch_size}: each per-device batch is cut into equal pipeline "
                "micro-batches."
            )
        micro_batches = self.args.per_device_train_batch_size // micro_batch_size
        if mcore.layout.virtual_stages > 1 and micro_batches < pp:
            raise TrainingError(
                f"The interleaved pipeline schedule (vpp={mcore.layout.virtual_stages}) needs at least pp={pp} "
                f"micro-batches per step, but per_device_train_batch_size={self.args.per_device_train_batch_size} / "
                f"micro_batch_size={micro_batch_size} = {micro_batches}. Use a larger batch or a smaller "
                "micro_batch_size."
            )
        self.micro_batch_size = micro_batch_size
        self._pipeline = PipelineStep(mcore)
        if self.args.fp16 and not self.uses_megatron_optimizer:
            # Dynamic loss scaling with torch's GradScaler semantics, its inf/nan check agreed by every rank.
            # Installed as accelerate's scaler, transformers' loop drives it as for fp16 on a GPU: step and
            # update through accelerate's optimizer, the scheduler held after a skip that accelerate sees
            # (not with a fused optimizer: see ModelParallelGradScaler), the scaler saved / restored in
            # checkpoints (scaler.pt). accelerate builds no scaler on the CPU (transformers' fp16 is fp32 there).
            self.accelerator.scaler = ModelParallelGradScaler("cuda" if torch.cuda.is_available() else "cpu")

    # ---- model wrapping ------------------------------------------------------------------------
    def _training_state(self) -> TrainingModule:
        """Build (once) megatron DDP around the chunks, the gradient bookkeeping and fp32 masters."""
        if self._training_module is not None:
            return self._training_module
        mcore = self._mcore
        config = mcore.chunks[0].config
        # The step's loss is already divided by its token count (step.py): mcore must neither divide by
        # the micro-batch count nor average over data-parallel replicas (it sums).
        config.calculate_per_token_loss = True
        if config.moe_router_enable_expert_bias:
            # transformers keeps a router's score-correction bias (e_score_correction_bias) fixed in training: a
            # buffer with no update rule. megatron's aux-loss-free balancing would move it after every step.
            config.moe_router_bias_update_rate = 0.0
        if self.args.bf16 and mcore.dtype == torch.float32:
            _cast_chunks(mcore, torch.bfloat16, (
                "bf16=True: MCoreTrainer casts the model to bfloat16 and keeps fp32 master weights in the optimizer "
                "(megatron-core mixed precision); the model stays in bfloat16 after training. Load it with "
                "dtype=torch.bfloat16 to skip this cast."
            ))
            config.params_dtype = config.pipeline_dtype = torch.bfloat16
            config.bf16 = True
        if self.args.fp16:
            if mcore.dtype == torch.bfloat16:
                raise TrainingError(
                    "fp16=True on a model loaded in bfloat16: load it with dtype=torch.float32 (MCoreTrainer casts it "
                    "to float16 with fp32 master weights) or torch.float16, or train with bf16=True."
                )
            if mcore.dtype == torch.float32:
                _cast_chunks(mcore, torch.float16, (
                    "fp16=True: MCoreTrainer casts the model to float16, keeps fp32 master weights in the optimizer and "
                    "scales the loss dynamically; the model stays in float16 after training."
                ))
            config.params_dtype = config.pipeline_dtype = torch.float16
            config.fp16 = True
            if not self.uses_megatron_optimizer:  # megatron's schedule: backward of loss × scale
                config.grad_scale_func = self.accelerator.scaler.scale
        mixed = mcore.dtype != torch.float32
        mark_tensor_parallel_weights(mcore.chunks)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("The model has no trainable parameters (every requires_grad is False).")
        ddp_chunks = wrap_chunks(mcore.chunks, fp32_grads=mixed, distributed_optimizer=self.distributed_optimizer)
        self._pipeline.kv_copies = KVHeadCopies.of(mcore.chunks, mcore.shard_layout)
        if self.uses_megatron_optimizer:
            self._training_module = TrainingModule(self.model, ddp_chunks, self._zero_megatron_grads)
            return self._training_module
        has_experts = getattr(config, "num_moe_experts", None) is not None
        self._grads = ShardedGrads(params, ddp_chunks, masters=mixed, has_experts=has_experts)
        if mixed and self.optimizer is not None:  # an optimizer passed in by the user
            swap_optimizer_params(self.optimizer, self._grads)
        self._training_module = TrainingModule(self.model, ddp_chunks, self._grads.zero)
        return self._training_module

    def _zero_megatron_grads(self) -> None:
        for ddp in self._training_module.ddp_chunks:
            ddp.zero_grad_buffer()
        if self._megatron_optimizer is not None:
            self._megatron_optimizer.zero_grad()

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader=None) -> nn.Module:
        if training:
            return self._training_state()
        if self._training_module is not None:
            return self._training_module
        return EvalModule(self.model)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        state = self._training_state()
        if self.optimizer is not None:
            self._sync_kv_copies_after_steps()
            return self.optimizer
        if not self.uses_megatron_optimizer:
            super().create_optimizer(self.model)
            if self._grads.masters:
                swap_optimizer_params(self.optimizer, self._grads)
            self._sync_kv_copies_after_steps()
            return self.optimizer
        decay = set(self.get_decay_parameter_names(self.model))
        no_decay = {id(p) for name, p in self.model.named_parameters() if name not in decay}
        self._megatron_optimizer = megatron_optimizer.build(
            self.args, list(state.ddp_chunks), no_decay, self._mcore.dtype, self.distributed_optimizer
        )
        self._megatron_optimizer.on_skip = self._report_skipped_step
        if self.args.fp16:  # megatron's schedule runs backward on loss × the optimizer's dynamic scale
            self._mcore.chunks[0].config.grad_scale_func = self._megatron_optimizer.scale_loss
        self.optimizer = self._megatron_optimizer
        self._sync_kv_copies_after_steps()
        return self.optimizer

    def _sync_kv_copies_after_steps(self) -> None:
        """After every optimizer step (and after fp32 masters are copied back) replicated KV heads take their first
        copy's values (kv_copies.py)."""
        copies = self._pipeline.kv_copies
        if copies is not None and getattr(self.optimizer, "_mcore_kv_sync", None) is not copies:
            self.optimizer.register_step_post_hook(lambda *_: copies.sync_weights())
            self.optimizer._mcore_kv_sync = copies

    def _report_skipped_step(self, skipped: bool) -> None:
        # transformers holds the scheduler when accelerate says the step was skipped (fp16 overflow).
        if hasattr(self.optimizer, "_is_overflow"):
            self.optimizer._is_overflow = skipped

    # ---- data ----------------------------------------------------------------------------------
    def get_train_dataloader(self):
        with data_parallel_loaders(self.accelerator):
            loader = super().get_train_dataloader()
        self._warn_uneven(self.train_dataset, self._train_batch_size, self.args.dataloader_drop_last)
        return loader

    def get_eval_dataloader(self, eval_dataset=None):
        with data_parallel_loaders(self.accelerator):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with data_parallel_loaders(self.accelerator):
            return super().get_test_dataloader(test_dataset)

    def _warn_uneven(self, dataset, batch_size: int, drop_last: bool) -> None:
        dp = dp_size()
        try:
            length = len(dataset)
        except TypeError:
            return
        if dp > 1 and not drop_last and length % (batch_size * dp):
            logger.warning_once(
                f"The dataset has {length} samples, not a multiple of per_device_train_batch_size × dp = "
                f"{batch_size} × {dp}: the last global batch is completed with samples from the start of the "
                "dataset (accelerate's even_batches), so those few samples count twice. Set "
                "dataloader_drop_last=True to drop the short batch instead."
            )

    def get_total_train_batch_size(self, args) -> int:
        return self._train_batch_size * args.gradient_accumulation_steps * dp_size()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Valid (shifted) labels of the optimizer step, summed over data-parallel replicas."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        count = sum(count_valid_targets(batch["labels"]) for batch in batch_samples).to(device=device, dtype=torch.int64)
        if self.args.average_tokens_across_devices and dp_size() > 1:
            dist.all_reduce(count, group=ps.get_data_parallel_group())
        return count

    def _model_batch(self, inputs: dict) -> dict:
        if "labels" not in inputs or "input_ids" not in inputs:
            raise TrainingError(
                f"MCoreTrainer needs `input_ids` and `labels` in every batch (got {sorted(inputs)}); for causal "
                "language modelling use e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)."
            )
        taken = MODEL_INPUTS + self._mcore.extra_inputs  # a vision-language model also takes its pixels
        unknown = sorted(set(inputs) - set(taken))
        if unknown:
            logger.warning_once(f"MCoreTrainer ignores batch keys {unknown} (the model takes {list(taken)}).")
        batch = {k: inputs[k] for k in taken if inputs.get(k) is not None}
        if not check_replica_agrees(batch):
            raise TrainingError(
                "The ranks of one model replica (its tensor- and pipeline-parallel ranks) received different batches. "
                "They must see identical data: use a map-style dataset (or an iterable one that yields the same "
                "sequence on every process) and do not shard it by global rank yourself."
            )
        return batch

    # ---- one step ------------------------------------------------------------------------------
    # True: the subclass's own compute_loss (TRL's DPO, GRPO, ...) is the loss, replayed through megatron (replay.py);
    # False: the causal-LM loss of the batch's labels.
    replays_compute_loss = False

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        module = self._training_state()
        self._pipeline.aux = router_aux_loss_for(self._mcore)
        module.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        if self.replays_compute_loss:
            return self._replayed_step(module, self._prepare_inputs(inputs), num_items_in_batch)
        batch = self._model_batch(self._prepare_inputs(inputs))
        if num_items_in_batch is None:
            num_items_in_batch = self._get_num_items_in_batch([batch], self.args.device)
        divisor = num_items_in_batch.to(batch["input_ids"].device).float().clamp(min=1)
        if not self.args.average_tokens_across_devices:
            divisor = divisor * dp_size()  # per-replica mean, averaged over replicas (transformers' DDP rule)
        last_of_step = self.accelerator.gradient_state.sync_gradients
        result = self._pipeline.run(
            list(module.ddp_chunks), batch, self.micro_batch_size, divisor, forward_only=False,
            finalize_grads=last_of_step,
        )
        self._after_backward(last_of_step)
        return result.loss.to(self.args.device, torch.float32)

    def _after_backward(self, last_of_step: bool) -> None:
        if last_of_step and self._grads is not None:
            self._grads.reduce_extras()
            self._grads.publish()
            self._unscaled = False

    def _replayed_step(self, module: TrainingModule, inputs: dict, num_items_in_batch) -> torch.Tensor:
        """The trainer's own compute_loss on every rank (record pass), its gradient through megatron's schedule
        (replay pass): replay.py. The loss is scaled for accumulation as transformers' training_step scales it."""
        check_replayable(self._mcore)
        recorder = Recorder(self._mcore, MODEL_INPUTS + self._mcore.extra_inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(recorder, inputs, num_items_in_batch=num_items_in_batch)
        scaled_for_accumulation = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_accumulation is None:
            scaled_for_accumulation = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if not scaled_for_accumulation:
            loss = loss / self.current_gradient_accumulation_steps
        last_of_step = self.accelerator.gradient_state.sync_gradients
        replay(recorder.calls, loss, self._pipeline, module.ddp_chunks, self.micro_batch_size, 1.0 / dp_size(), last_of_step)
        self._after_backward(last_of_step)
        return loss.detach().to(self.args.device, torch.float32)

    def _unscale_gradients(self) -> None:
        """fp16: divide the master gradients by the loss scale (and agree on overflow) once per step, before
        their norm is taken; the scaler's `step` then does not unscale again."""
        if self.args.fp16 and not self._unscaled:
            self.accelerator.scaler.unscale_(getattr(self.optimizer, "optimizer", self.optimizer))
            self._unscaled = True

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        if self._megatron_optimizer is not None:
            return self._megatron_optimizer.clip_grad_norm(self.args.max_grad_norm)
        self._unscale_gradients()
        return self._grads.clip(self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        if grad_norm is not None:
            return grad_norm
        if self._megatron_optimizer is not None:
            return self._megatron_optimizer.grad_norm()
        self._unscale_gradients()
        return self._grads.norm()

    def _track_num_input_tokens(self, inputs) -> None:
        # transformers sums over every process; the ranks of one replica saw the same tokens.
        before = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen = before + (self.state.num_input_tokens_seen - before) // _model_parallel_size()

    def floating_point_ops(self, inputs: dict) -> int:
        # transformers sums this over every process: each rank of a replica reports its share.
        return super().floating_point_ops(inputs) / _model_parallel_size()

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluation_loop(self, *args, **kwargs):
        self.gather_function = self._gather_for_metrics
        return super().evaluation_loop(*args, **kwargs)

    def _gather_for_metrics(self, data, use_gather_object: bool = False):
        """accelerate's gather_for_metrics, over the data-parallel group instead of the world: the last batch's
        padding (transformers repeats its loss eval_batch_size times) is cut to the samples there are."""
        gathered = gather_over_data_parallel(data) if dp_size() > 1 else data
        state = self.accelerator.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            gathered = truncate_to(gathered, state.remainder)
        return gathered

    def prediction_step(self, model, inputs: dict, prediction_loss_only: bool, ignore_keys=None):
        """Loss = sum of token losses / tokens over the global (all data-parallel replicas) batch.

        Loss only: megatron's schedule, forward only. Logits wanted: the model's own forward (full
        vocabulary on every rank), loss from those logits.
        """
        if self.replays_compute_loss:  # the trainer's own evaluation, through the model's fused head at any layout
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        if prediction_loss_only and labels is not None:
            batch = self._model_batch(inputs)
            self._pipeline.aux = router_aux_loss_for(self._mcore)
            with torch.no_grad():
                result = self._pipeline.run(self._mcore.chunks, batch, self.micro_batch_size, None, forward_only=True)
            loss = result.loss_sum / result.tokens.clamp(min=1)
            if result.aux is not None:  # transformers' eval loss includes coefficient × aux, per batch
                loss = loss + self._pipeline.aux.coefficient * result.aux
            return loss.float().to(self.args.device), None, None
        with torch.no_grad():
            extra = {key: inputs[key] for key in self._mcore.extra_inputs if inputs.get(key) is not None}
            outputs = self._mcore(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                position_ids=inputs.get("position_ids"), **extra,
            )
        logits, loss = outputs.logits, None
        if labels is not None:
            targets = shifted_targets(labels)
            token_losses = nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            totals = torch.stack([token_losses.double(), targets.ne(IGNORE_INDEX).sum().double()])
            if dp_size() > 1:
                dist.all_reduce(totals, group=ps.get_data_parallel_group())
            loss = (totals[0] / totals[1].clamp(min=1)).float()
            aux = getattr(outputs, "aux_loss", None)
            if aux is not None:  # the model's forward computed it over this replica's rows
                aux = aux.detach().double().reshape(1)
                if dp_size() > 1:
                    dist.all_reduce(aux, group=ps.get_data_parallel_group())
                    aux = aux / dp_size()
                loss = loss + self._mcore.arch.router_aux_loss()[2] * aux[0].float()
        if prediction_loss_only:
            return loss, None, None
        return loss, logits, labels

    # ---- saving --------------------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Collective: every rank takes part in writing the model (transformers before 5.24 calls `_save` on
        the main process only, which would leave the other ranks' shards out and the ranks waiting)."""
        self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save")

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """Collective: the full model as an HF folder (adapters only for a PEFT model) in `output_dir`.

        Files already in `output_dir` (checkpoints, logs) stay; a previous model's weights are replaced.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is not None:
            logger.warning_once("MCoreTrainer saves the model's own weights; the state_dict argument is ignored.")
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        barrier()
        if _is_peft_model(self.model):
            from ..peft import save_adapter  # an HF PEFT folder at any tp / pp

            save_adapter(self.model, output_dir)
        else:
            self._mcore.save_pretrained(output_dir)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        barrier()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        ckpt.save_training_state(output_dir, self._mcore, self.model, self._stepping_optimizer(), self._grads)
        if self.args.should_save and self.lr_scheduler is not None:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _stepping_optimizer(self):
        """megatron's optimizer, or the torch optimizer accelerate wraps (its state_dict is the inner one's)."""
        return self._megatron_optimizer if self._megatron_optimizer is not None else self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        ckpt.load_model_state(resume_from_checkpoint, self._mcore, self.model)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if checkpoint is None:
            return
        ckpt.load_optimizer_state(checkpoint, self._mcore, self.model, self._stepping_optimizer(), self._grads)
        scheduler_file = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(scheduler_file) and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))

    def _load_rng_state(self, checkpoint: Optional[str]) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None:
            # At another layout megatron's streams are reseeded from seed + step (checkpoint.load_rng_state).
            ckpt.load_rng_state(checkpoint, self._mcore, self.args.seed, self.state.global_step)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        logger.info(f"Loading best model from {best} (score: {self.state.best_metric}).")
        ckpt.load_model_state(best, self._mcore, self.model)
        if self._megatron_optimizer is not None:
            self._megatron_optimizer.reload_model_params()
        if self._grads is not None and self._grads.masters:
            with torch.no_grad():
                for param, target in zip(self._grads.params, self._grads.targets):
                    target.copy_(param)


def _cast_chunks(mcore: MCoreModelForCausalLM, dtype: torch.dtype, warning: str) -> None:
    """Mixed precision: the model's weights in `dtype` (the optimizer keeps fp32 masters), said once."""
    logger.warning(warning)
    for chunk in mcore.chunks:
        chunk.to(dtype)
