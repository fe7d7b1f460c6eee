"""Training state of a sharded model in a Trainer checkpoint folder, for exact resumption.

A `checkpoint-N/` folder written by MCoreTrainer holds what transformers' Trainer writes (an HF model
folder that `AutoModelForCausalLM` loads, `trainer_state.json`, `scheduler.pt`, `rng_state_*.pth`,
`training_args.bin`) plus:

    mcore_state/
      layout.json                      tp, pp, vpp, ep, dp, world size, dtype, format version
      mp_rank_{tp}_{pp}_{ep}.pt        per model-parallel position (written by one data-parallel rank):
                                       {"model": this rank's parameters (adapters too), bit-exact, by name,
                                        "optimizer": the torch optimizer's state_dict,
                                        "masters": the fp32 master weights (mixed precision), or None}
      rng_rank_{global rank}.pt        megatron's named RNG streams (model-parallel dropout) per rank

Resuming needs the same tp / pp / vpp / ep (each rank reads the file of its position); the
data-parallel size may change. megatron-core's dist_checkpointing (resharding on load) runs on the CPU
only with further bridges; see docs/training.md.
"""

from __future__ import annotations

import json
import os
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import random as mcore_random

from .errors import TrainingError

STATE_DIR = "mcore_state"
LAYOUT_FILE = "layout.json"
FORMAT_VERSION = 1


def describe_layout(model) -> dict:
    layout = model.layout
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {
        "format_version": FORMAT_VERSION,
        "tp": layout.tp,
        "pp": layout.pp,
        "vpp": layout.virtual_stages,
        "ep": layout.ep,
        "dp": ps.get_data_parallel_world_size(),
        "world_size": world,
        "dtype": str(model.dtype).replace("torch.", ""),
    }


def _position_file(folder: str) -> str:
    tp = ps.get_tensor_model_parallel_rank()
    pp = ps.get_pipeline_model_parallel_rank()
    ep = ps.get_expert_model_parallel_rank()
    return os.path.join(folder, STATE_DIR, f"mp_rank_{tp:02d}_{pp:03d}_{ep:03d}.pt")


def _writes_position(model) -> bool:
    """One rank per model-parallel position writes (experts differ across expert-parallel ranks)."""
    if model.layout.ep > 1:
        return ps.get_expert_data_parallel_rank() == 0
    return ps.get_data_parallel_rank() == 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_training_state(folder: str, model, trained, optimizer, grads) -> None:
    """Collective: write this rank's share of mcore_state/ (see the module docstring)."""
    state_dir = os.path.join(folder, STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        with open(os.path.join(state_dir, LAYOUT_FILE), "w") as f:
            json.dump(describe_layout(model), f, indent=1)
    if _writes_position(model):
        payload = {
            "model": {name: p.detach().clone() for name, p in trained.named_parameters()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "masters": [t.detach().clone() for t in grads.targets] if grads is not None and grads.masters else None,
        }
        _atomic_save(payload, _position_file(folder))
    tracker = mcore_random.get_cuda_rng_tracker()
    _atomic_save({"tracker": tracker.get_states()}, os.path.join(state_dir, f"rng_rank_{rank:05d}.pt"))
    _barrier()


def has_training_state(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STATE_DIR, LAYOUT_FILE))


def check_layout(folder: str, model) -> None:
    """Refuse a checkpoint whose model-parallel layout differs from this model's, naming both."""
    if not has_training_state(folder):
        raise TrainingError(
            f"{folder} holds no MCoreTrainer training state ({STATE_DIR}/{LAYOUT_FILE} is missing), so training "
            "cannot resume from it. To start from its weights instead, load it with "
            "MCoreModelForCausalLM.from_pretrained and train without resume_from_checkpoint."
        )
    with open(os.path.join(folder, STATE_DIR, LAYOUT_FILE)) as f:
        saved = json.load(f)
    current = describe_layout(model)
    keys = ("tp", "pp", "vpp", "ep")
    if any(saved.get(k) != current[k] for k in keys):
        raise TrainingError(
            f"{folder} was saved with tp={saved.get('tp')}, pp={saved.get('pp')}, vpp={saved.get('vpp')}, "
            f"ep={saved.get('ep')}; this model runs tp={current['tp']}, pp={current['pp']}, vpp={current['vpp']}, "
            f"ep={current['ep']}. Resume with the saved layout (the data-parallel size may change), or start a new "
            "run from the checkpoint's HF weights: MCoreModelForCausalLM.from_pretrained(checkpoint, tp=..., pp=...)."
        )


def _load_position(folder: str) -> dict:
    path = _position_file(folder)
    if not os.path.isfile(path):
        raise TrainingError(f"{path} is missing: the checkpoint is incomplete (was it written by every rank?).")
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def load_model_state(folder: str, model, trained) -> None:
    """Copy this rank's saved parameters into `trained` (the model, or its PEFT wrapper), bit-exact."""
    check_layout(folder, model)
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


def load_optimizer_state(folder: str, model, optimizer, grads) -> None:
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


def load_rng_state(folder: str) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = os.path.join(folder, STATE_DIR, f"rng_rank_{rank:05d}.pt")
    if os.path.isfile(path):
        states = torch.load(path, map_location="cpu", weights_only=True)["tracker"]
        mcore_random.get_cuda_rng_tracker().set_states(states)


def _atomic_save(payload, path: str) -> None:
    partial = path + ".partial"
    torch.save(payload, partial)
    os.replace(partial, path)
