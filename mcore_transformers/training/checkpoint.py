"""The MCoreTrainer checkpoint folder: what a sharded model adds to transformers' `checkpoint-N/`, and
which way a resume goes.

A `checkpoint-N/` folder written by MCoreTrainer holds what transformers' Trainer writes (an HF model
folder that `AutoModelForCausalLM` loads — or, for a PEFT model, an HF adapter folder —
`trainer_state.json`, `scheduler.pt`, `rng_state_*.pth`, `training_args.bin`) plus `mcore_state/`:

    layout.json                        tp, pp, vpp, ep, etp, dp, world size, dtype, optimizer kind, format version
    rng_rank_{global rank}.pt          megatron's named RNG streams (model-parallel dropout) per rank

and, with megatron-core's optimizer ("megatron" / "megatron-distributed"):

    dist_ckpt/                         megatron-core dist_checkpointing: model + optimizer, resharded on
                                       load by megatron itself (dist_checkpoint.py)

or, with transformers' torch optimizer ("torch": optimizers megatron lacks, PEFT adapters):

      mp_rank_{tp}_{pp}_{ep}.pt        per model-parallel position (written by one data-parallel rank):
                                       {"model": this rank's parameters (adapters too), bit-exact, by name,
                                        "optimizer": the torch optimizer's state_dict,
                                        "masters": the fp32 master weights (mixed precision), or None}
      rng_rank_{global rank}.pt        megatron's named RNG streams (model-parallel dropout) per rank
      hf_optimizer/                    the same optimizer state without a layout (reshard.py)

Resuming at the saved tp / pp / vpp / ep / etp is bit for bit (the data-parallel size may change).
At another layout dist_ckpt/ reshards itself; the torch path reshards from the HF folder and
hf_optimizer/ (reshard.py). Megatron's RNG streams are then not restored (they belong to rank
positions that no longer exist): they are reseeded from `args.seed + global_step` with megatron's
per-rank offsets (see `load_rng_state`).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import random as mcore_random

from ..conversion import distributed
from ..conversion.distributed import LAYOUT_FILE, STATE_DIR
from ..runtime.parallel import barrier, global_rank, is_rank0, seed_parallel_rng
from . import dist_checkpoint, reshard
from .errors import TrainingError
from .optimizer import MegatronOptimizerForTrainer

# format 2: hf_optimizer/ (layout-free optimizer state), etp; 3: optimizer kind, dist_ckpt/, query groups
FORMAT_VERSION = distributed.LAYOUT_FORMAT_VERSION
LAYOUT_KEYS = ("tp", "pp", "vpp", "ep", "etp")


def optimizer_kind(optimizer) -> str:
    if isinstance(optimizer, MegatronOptimizerForTrainer):
        return "megatron-distributed" if optimizer.megatron.config.use_distributed_optimizer else "megatron"
    return "torch"


def optimizer_classes(optimizer) -> list[str]:
    """The torch optimizer class(es) that hold the state (megatron's inner ones; accelerate's wrapper unwrapped)."""
    if isinstance(optimizer, MegatronOptimizerForTrainer):
        inner = [o.optimizer for o in optimizer.chained if getattr(o, "optimizer", None) is not None]
    else:
        inner = [getattr(optimizer, "optimizer", optimizer)] if optimizer is not None else []
    return sorted({f"{type(o).__module__}.{type(o).__name__}" for o in inner})


def describe_layout(model, optimizer=None) -> dict:
    return {
        **distributed.layout_record(model),
        "dp": ps.get_data_parallel_world_size(),
        "optimizer": optimizer_kind(optimizer),
        "optimizer_classes": optimizer_classes(optimizer),
    }


def _position_file(folder: str) -> str:
    tp = ps.get_tensor_model_parallel_rank()
    pp = ps.get_pipeline_model_parallel_rank()
    ep = ps.get_expert_model_parallel_rank()
    return os.path.join(folder, STATE_DIR, f"mp_rank_{tp:02d}_{pp:03d}_{ep:03d}.pt")


def _rng_file(folder: str) -> str:
    return os.path.join(folder, STATE_DIR, f"rng_rank_{global_rank():05d}.pt")


def _dist_dir(folder: str) -> str:
    return distributed.dist_dir(folder)


def _layout_free_dir(folder: str) -> str:
    return os.path.join(folder, STATE_DIR, reshard.RESHARD_DIR)


def _writes_position(model) -> bool:
    """One rank per model-parallel position writes (experts differ across expert-parallel ranks)."""
    if model.layout.ep > 1:
        return ps.get_expert_data_parallel_rank() == 0
    return ps.get_data_parallel_rank() == 0


def _atomic_save(payload, path: str) -> None:
    partial = path + ".partial"
    torch.save(payload, partial)
    os.replace(partial, path)


# ---- saving --------------------------------------------------------------------------------------


def save_training_state(folder: str, model, trained, optimizer, grads) -> None:
    """Collective: write this rank's share of mcore_state/ and (rank 0) hf_optimizer/ (module docstring)."""
    state_dir = os.path.join(folder, STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    if is_rank0():
        with open(os.path.join(state_dir, LAYOUT_FILE), "w") as f:
            json.dump(describe_layout(model, optimizer), f, indent=1)
    _atomic_save({"tracker": mcore_random.get_cuda_rng_tracker().get_states()}, _rng_file(folder))
    if isinstance(optimizer, MegatronOptimizerForTrainer):
        dist_checkpoint.save(_dist_dir(folder), model, optimizer)
        return
    if _writes_position(model):
        payload = {
            "model": {name: p.detach().clone() for name, p in trained.named_parameters()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "masters": [t.detach().clone() for t in grads.targets] if grads is not None and grads.masters else None,
        }
        _atomic_save(payload, _position_file(folder))
    if grads is not None:
        reshard.save_layout_free_state(_layout_free_dir(folder), model, trained, optimizer, grads, FORMAT_VERSION)
    barrier()


# ---- loading -------------------------------------------------------------------------------------


def has_training_state(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STATE_DIR, LAYOUT_FILE))


def _saved_layout(folder: str) -> dict:
    if not has_training_state(folder):
        raise TrainingError(
            f"{folder} holds no MCoreTrainer training state ({STATE_DIR}/{LAYOUT_FILE} is missing), so training "
            "cannot resume from it. To start from its weights instead, load it with "
            "MCoreModelForCausalLM.from_pretrained and train without resume_from_checkpoint."
        )
    with open(os.path.join(folder, STATE_DIR, LAYOUT_FILE)) as f:
        saved = json.load(f)
    saved.setdefault("etp", saved.get("tp"))  # format 1 did not record it: the default, tp
    saved.setdefault("optimizer", "torch")  # formats 1-2: transformers' optimizer only
    return saved


def holds_weights_only(folder: str) -> bool:
    """A distributed checkpoint of weights alone (`convert`, `save_distributed_checkpoint`). transformers'
    Trainer resumes only from a folder with its trainer state (5.19-5.24 read trainer_state.json
    unconditionally), so such a folder is a model to load, not a run to resume."""
    saved = distributed.read_layout(folder)
    return saved is not None and "optimizer" in saved and saved["optimizer"] is None


def same_layout(folder: str, model) -> bool:
    """Whether `folder` was saved at this model's tp / pp / vpp / ep / etp (its per-position files fit)."""
    saved, current = _saved_layout(folder), describe_layout(model)
    return all(saved.get(k) == current[k] for k in LAYOUT_KEYS)


def _check_optimizer_kind(folder: str, model, optimizer) -> None:
    layout = _saved_layout(folder)
    saved, current = layout["optimizer"], optimizer_kind(optimizer)
    if saved != current:
        switch = {
            "torch": "MCoreTrainer(megatron_optimizer=False)",
            "megatron": "MCoreTrainer(megatron_optimizer=True, distributed_optimizer=False)",
            "megatron-distributed": "MCoreTrainer(distributed_optimizer=True)",
        }[saved]
        raise TrainingError(
            f"{folder} holds the state of the {saved!r} optimizer; this trainer steps the {current!r} one, whose state "
            f"is laid out differently. Resume with {switch} (and the same optim), or start a new run from the "
            "checkpoint's HF weights: MCoreModelForCausalLM.from_pretrained(checkpoint, ...)."
        )
    saved_ep, current_ep = layout["ep"], model.layout.ep
    if current != "torch" and (saved_ep > 1) != (current_ep > 1):
        raise TrainingError(
            f"{folder} was saved at ep={saved_ep}; this model runs ep={current_ep}. megatron-core's optimizer keeps the "
            "experts' state apart from the rest only under expert parallelism (ep > 1), so its state does not reshard "
            "between ep=1 and ep > 1. Resume at an ep on the same side, or train with MCoreTrainer(megatron_optimizer="
            "False), whose checkpoints reshard across any ep."
        )
    saved_classes = layout.get("optimizer_classes")
    if saved_classes is not None and saved_classes != optimizer_classes(optimizer):
        raise TrainingError(
            f"{folder} holds the state of {', '.join(saved_classes)}; this trainer steps "
            f"{', '.join(optimizer_classes(optimizer))}. Resume with the optim it was trained with, or start a new run "
            "from the checkpoint's HF weights: MCoreModelForCausalLM.from_pretrained(checkpoint, ...)."
        )


def _layouts(saved: dict, current: dict) -> str:
    def text(d):
        return ", ".join(f"{k}={d.get(k)}" for k in LAYOUT_KEYS)

    return f"saved with {text(saved)}; this model runs {text(current)}"


def _reshard_meta(folder: str, model) -> dict:
    """The layout-free optimizer state's meta.pt, or TrainingError saying why this checkpoint cannot reshard."""
    saved, current = _saved_layout(folder), describe_layout(model)
    meta = reshard.read_meta(_layout_free_dir(folder))
    fix = (
        " Resume with the saved layout (the data-parallel size may change), or start a new run from the checkpoint's "
        "HF weights: MCoreModelForCausalLM.from_pretrained(checkpoint, tp=..., pp=...) (the optimizer state is then fresh)."
    )
    if meta is None:
        raise TrainingError(
            f"{folder} was {_layouts(saved, current)}. Resuming at another layout reshards from "
            f"{STATE_DIR}/{reshard.RESHARD_DIR}/, which this checkpoint does not have (written before format "
            f"{FORMAT_VERSION}, or incomplete).{fix}"
        )
    if meta.get("problem"):
        raise TrainingError(
            f"{folder} was {_layouts(saved, current)}, and its optimizer state cannot be resharded: {meta['problem']} "
            f"(only state tensors shaped like their parameter, e.g. AdamW's, can be re-split).{fix}"
        )
    return meta


def _load_position(folder: str) -> dict:
    path = _position_file(folder)
    if not os.path.isfile(path):
        raise TrainingError(f"{path} is missing: the checkpoint is incomplete (was it written by every rank?).")
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def load_model_state(folder: str, model, trained) -> None:
    """Copy the saved parameters into `trained` (the model, or its PEFT wrapper): this rank's file at the
    saved layout (bit-exact), else resharded (module docstring)."""
    if holds_weights_only(folder):
        raise TrainingError(
            f"{folder} holds weights only (a distributed checkpoint written by `mcore-transformers convert` or "
            "save_distributed_checkpoint), no training state to resume. To start from its weights, load it with "
            "MCoreModelForCausalLM.from_pretrained(folder, tp=..., pp=...) and train without resume_from_checkpoint."
        )
    if _saved_layout(folder)["optimizer"] != "torch":
        dist_checkpoint.load_model(folder, model)
        return
    if not same_layout(folder, model):
        reshard.load_model(folder, _layout_free_dir(folder), _reshard_meta(folder, model), model, trained)
        return
    saved = _load_position(folder)["model"]
    params = dict(trained.named_parameters())
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise TrainingError(
            f"The training state in {folder} does not match this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Was it written for another model (or another PEFT setup)?"
        )
    for name, param in params.items():
        param.copy_(saved[name].to(param.device))


def load_optimizer_state(folder: str, model, trained, optimizer, grads) -> None:
    _check_optimizer_kind(folder, model, optimizer)
    if isinstance(optimizer, MegatronOptimizerForTrainer):
        dist_checkpoint.load_optimizer(folder, model, optimizer)
        return
    if not same_layout(folder, model):
        meta = _reshard_meta(folder, model)
        reshard.load_optimizer(folder, _layout_free_dir(folder), meta, model, trained, optimizer, grads)
        return
    saved = _load_position(folder)
    if optimizer is not None and saved["optimizer"] is not None:
        optimizer.load_state_dict(saved["optimizer"])
    if grads is not None and grads.masters:
        if saved["masters"] is None:
            # Saved without masters (fp32 run): the masters follow the (already loaded) weights.
            return
        with torch.no_grad():
            for target, value in zip(grads.targets, saved["masters"]):
                target.copy_(value.to(target.device))


def load_rng_state(folder: str, model=None, seed: Optional[int] = None, step: int = 0) -> None:
    """Megatron's named RNG streams: restored per rank at the saved layout. At another layout they are
    reseeded from `seed + step` with megatron's per-rank offsets (model-parallel stream: + 2718 + tp rank),
    since the saved streams belong to rank positions that no longer exist: dropout masks after a
    resharded resume are reproducible for that layout but differ from an uninterrupted run's."""
    if model is not None and has_training_state(folder) and not same_layout(folder, model):
        if seed is not None:
            seed_parallel_rng(seed + step)
        return
    path = _rng_file(folder)
    if os.path.isfile(path):
        states = torch.load(path, map_location="cpu", weights_only=True)["tracker"]
        mcore_random.get_cuda_rng_tracker().set_states(states)
