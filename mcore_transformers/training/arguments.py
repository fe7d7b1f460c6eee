"""What transformers' `TrainingArguments` mean for a megatron-core model: the model argument, arguments
MCoreTrainer refuses or ignores, and which optimizer steps."""

from __future__ import annotations

from typing import Any, Optional

from transformers.utils import logging

from ..model.causal_lm import MCoreModelForCausalLM
from .errors import TrainingError
from .optimizer import megatron_optimizer_unsupported

logger = logging.get_logger(__name__)


def find_mcore_model(model: Any) -> MCoreModelForCausalLM:
    """The MCoreModelForCausalLM inside `model` (itself, or the base model of a PEFT wrapper)."""
    inner = model
    for _ in range(4):
        if isinstance(inner, MCoreModelForCausalLM):
            return inner
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif hasattr(inner, "base_model") and inner.base_model is not inner:
            inner = inner.base_model
        else:
            break
    raise TrainingError(
        f"MCoreTrainer trains an MCoreModelForCausalLM (optionally wrapped by PEFT); got {type(model).__name__}. "
        "Load the model with MCoreModelForCausalLM.from_pretrained(..., tp=, pp=), or use transformers.Trainer "
        "for other models."
    )


def check_arguments(args, compute_loss_func) -> None:
    """TrainingError for what MCoreTrainer cannot honour; a warning for torch-DDP options it ignores."""
    refused = {
        "deepspeed": args.deepspeed,
        "fsdp": bool(args.fsdp),
        "torch_compile": args.torch_compile,
        "auto_find_batch_size": args.auto_find_batch_size,
        "neftune_noise_alpha": args.neftune_noise_alpha is not None,
        "use_liger_kernel": args.use_liger_kernel,
        "label_smoothing_factor": args.label_smoothing_factor != 0,
        "compute_loss_func": compute_loss_func is not None,
        "parallelism_config": getattr(args, "parallelism_config", None) is not None,
    }
    for name, value in refused.items():
        if value:
            reason = {
                "deepspeed": "megatron-core shards the model itself (tp/pp/dp); DeepSpeed would shard it again",
                "fsdp": "megatron-core shards the model itself (tp/pp/dp); FSDP would shard it again",
                "parallelism_config": "parallel sizes come from MCoreModelForCausalLM.from_pretrained(tp=, pp=)",
            }.get(name, "the loss is computed by megatron's vocab-parallel cross-entropy inside the pipeline")
            raise TrainingError(f"MCoreTrainer does not support `{name}`: {reason}.")
    if args.fp16 and args.bf16:
        raise TrainingError("fp16=True and bf16=True together: choose one mixed-precision dtype.")
    if args.optim in ("lomo", "adalomo"):
        raise TrainingError(f"optim={args.optim!r} fuses the optimizer into backward; MCoreTrainer steps after "
                            "megatron reduces the gradients. Choose another optimizer (e.g. adamw_torch).")
    ignored = [
        name for name in ("ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph")
        if getattr(args, name, None) is not None
    ]
    if ignored:
        logger.warning(
            f"MCoreTrainer ignores {', '.join(ignored)}: they configure torch DDP, and gradients are reduced by "
            "megatron-core's DistributedDataParallel over the data-parallel group instead."
        )


def choose_optimizer(args, model, mcore: MCoreModelForCausalLM, wanted: Optional[bool], distributed: bool,
                     given: bool) -> bool:
    """Whether megatron-core's optimizer trains (else transformers' torch optimizer): `wanted` is
    MCoreTrainer's megatron_optimizer (None: where it can), `given` an optimizer passed in."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_chunks = {id(p) for chunk in mcore.chunks for p in chunk.parameters()}
    outside = any(id(p) not in in_chunks for p in trainable)
    reason = megatron_optimizer_unsupported(args, outside, distributed)
    if given:
        reason = "an optimizer was passed in (optimizers=...)"
    if reason is not None and (wanted or distributed):
        raise TrainingError(
            f"megatron-core's optimizer{' (distributed_optimizer=True)' if distributed else ''} cannot train here: "
            f"{reason}. Use optim='adamw_torch' (or 'sgd') without optim_args, or MCoreTrainer(megatron_optimizer="
            "False, distributed_optimizer=False) for transformers' optimizer."
        )
    if reason is not None and wanted is None:
        logger.info(f"MCoreTrainer steps transformers' torch optimizer: {reason}.")
    return reason is None and wanted is not False
