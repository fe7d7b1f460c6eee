"""megatron-core's optimizer behind transformers' Trainer: configured from `TrainingArguments`, driven by its loop.

`get_megatron_optimizer` builds what Megatron-LM trains with: fp32 master weights for a bf16/fp16
model, dynamic loss scaling for fp16, one optimizer for dense and one for expert parameters, and
optionally the distributed optimizer (state and masters sharded over data-parallel ranks). The
Trainer's loop calls, in this order: `clip_grad_norm` (MCoreTrainer's `_clip_grad_norm`), `step`,
the learning-rate scheduler (transformers', on the inner optimizers' param groups), `zero_grad`.
"""

from __future__ import annotations

import collections

from typing import Optional

import torch

from ..runtime.cpu import megatron_optimizer_device
from .errors import TrainingError

# transformers' `optim` names that megatron-core's optimizer computes (its Adam is decoupled: AdamW).
MEGATRON_OPTIMIZERS = {
    "adamw_torch": "adam",
    "adamw_torch_fused": "adam",
    "adamw_apex_fused": "adam",
    "sgd": "sgd",
}


def _optim_name(args) -> str:
    return str(getattr(args.optim, "value", args.optim))


def megatron_optimizer_unsupported(args, trainable_outside_chunks: bool, distributed: bool) -> Optional[str]:
    """Why megatron-core's optimizer cannot train with these arguments (None: it can)."""
    optim = _optim_name(args)
    if optim not in MEGATRON_OPTIMIZERS:
        return f"optim={optim!r} is not one of megatron-core's optimizers ({', '.join(MEGATRON_OPTIMIZERS)})"
    if distributed and MEGATRON_OPTIMIZERS[optim] == "sgd":
        # megatron-core 0.16's distributed optimizer reads a per-parameter `step` that SGD without momentum lacks
        return "the distributed optimizer checkpoints Adam-family optimizers only"
    if args.optim_args:
        return f"optim_args={args.optim_args!r} configures transformers' optimizer classes"
    if trainable_outside_chunks:
        return "some trainable parameters (PEFT adapters) live outside megatron's modules"
    return None


def optimizer_config(args, dtype: torch.dtype, distributed: bool):
    """`TrainingArguments` → megatron's OptimizerConfig (fp16 loss scaling with torch's GradScaler defaults)."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer=MEGATRON_OPTIMIZERS[_optim_name(args)],
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_epsilon,
        sgd_momentum=0.0,  # transformers' "sgd" is torch.optim.SGD without momentum
        clip_grad=args.max_grad_norm or 0.0,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        initial_loss_scale=2.0**16,
        min_loss_scale=1.0,
        loss_scale_window=2000,
        hysteresis=1,
        use_distributed_optimizer=distributed,
    )


def build(args, chunks: list, no_decay: set[int], dtype: torch.dtype, distributed: bool) -> "MegatronOptimizerForTrainer":
    """megatron-core's optimizer over the DDP-wrapped `chunks`; parameters whose id is in `no_decay`
    get no weight decay (transformers' choice: biases and norms)."""
    from megatron.core.optimizer import ParamKey, ParamPredicate, get_megatron_optimizer

    config = optimizer_config(args, dtype, distributed)
    no_decay_key = ParamKey(predicate=ParamPredicate(name="transformers_no_decay", fn=lambda p: id(p) in no_decay))
    with megatron_optimizer_device():
        megatron = get_megatron_optimizer(config, chunks, config_overrides={no_decay_key: {"wd_mult": 0.0}})
    adapter = MegatronOptimizerForTrainer(megatron)
    if _optim_name(args) == "adamw_torch_fused":
        use_torch_fused_kernel(adapter)
    return adapter


def use_torch_fused_kernel(adapter: "MegatronOptimizerForTrainer") -> None:
    """transformers' adamw_torch_fused: where megatron falls back to torch's AdamW (no Transformer Engine /
    Apex), step it with torch's fused kernel too (megatron builds it with the per-tensor loop)."""
    for optimizer in adapter.chained:
        inner = getattr(optimizer, "optimizer", None)
        if type(inner) is torch.optim.AdamW:
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False


class MegatronOptimizerForTrainer(torch.optim.Optimizer):
    """A megatron-core optimizer seen as the torch optimizer transformers' Trainer expects.

    `param_groups` are the inner torch optimizers' own groups, so transformers' scheduler sets the
    learning rate megatron steps with (megatron's per-group weight-decay multiplier is applied once
    here; megatron's own scheduler is not used). `step` skips the update when fp16 gradients
    overflowed; `skipped` then tells the Trainer to hold the scheduler, as accelerate does for
    torch's GradScaler.
    """

    def __init__(self, megatron):  # no Optimizer.__init__: the parameters live in megatron's groups
        self.megatron = megatron
        self.defaults = dict(megatron.param_groups[0]) if megatron.param_groups else {}
        self.defaults.pop("params", None)
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                      "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                      "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, collections.OrderedDict())  # torch's hook handles keep weak references
        for group in self.param_groups:
            group["weight_decay"] = group["weight_decay"] * group.get("wd_mult", 1.0)
        self._found_inf: Optional[bool] = None  # this step's gradients prepared; whether they overflowed
        self.skipped = False
        self.on_skip = None  # set by MCoreTrainer: tells accelerate the step was skipped

    @property
    def param_groups(self) -> list[dict]:
        return self.megatron.param_groups

    @property
    def state(self):
        return self.megatron.state

    @property
    def chained(self) -> list:
        return list(getattr(self.megatron, "chained_optimizers", [self.megatron]))

    def _prepare(self) -> bool:
        """Once per step: model grads → fp32 main grads, unscaled (fp16), overflow agreed by every rank."""
        if self._found_inf is None:
            with megatron_optimizer_device():
                self._found_inf = bool(self.megatron.prepare_grads())
        return self._found_inf

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients over every shard (megatron's: TP shards once, replicas once)."""
        if self._prepare():
            return torch.tensor(float("inf"))
        with megatron_optimizer_device():
            return torch.tensor(float(self.megatron.get_grad_norm()))

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so that their global norm is at most `max_norm`; returns the norm before."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        norm = self.grad_norm()
        if not torch.isfinite(norm):
            return norm
        with megatron_optimizer_device():
            for optimizer in self.chained:
                parameters = optimizer.get_parameters()
                if getattr(optimizer, "is_stub_optimizer", False) or not parameters:
                    continue
                clip_grad_by_total_norm_fp32(
                    parameters, max_norm=max_norm, total_norm=float(norm),
                    use_decoupled_grad=optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise TrainingError("megatron-core's optimizer takes no closure.")
        self.skipped = self._prepare()
        if not self.skipped:
            with megatron_optimizer_device():
                self.megatron.step_with_ready_grads()
            for hook in list(self._optimizer_step_post_hooks.values()):  # torch's Optimizer.step would run them
                hook(self, (), {})
        self._found_inf = None
        if self.on_skip is not None:
            self.on_skip(self.skipped)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.megatron.zero_grad(set_to_none=set_to_none)
        self._found_inf = None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.megatron.scale_loss(loss)

    def loss_scale(self) -> float:
        return float(self.megatron.get_loss_scale())

    def reload_model_params(self) -> None:
        """After the model's weights were replaced (best model at the end): masters follow them."""
        with megatron_optimizer_device():
            self.megatron.reload_model_params()

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False, metadata=None) -> dict:
        with megatron_optimizer_device():
            return self.megatron.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)

    def state_dict(self) -> dict:
        """megatron's (non-sharded) state dict; empty before the first step. Checkpoints use
        `sharded_state_dict` (dist_checkpoint.py); accelerate round-trips this one when it wraps the optimizer."""
        if not any(len(o.optimizer.state) for o in self.chained if getattr(o, "optimizer", None) is not None):
            return {}
        with megatron_optimizer_device():
            return self.megatron.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        with megatron_optimizer_device():
            self.megatron.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.megatron).__name__})"
