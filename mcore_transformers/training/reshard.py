"""Layout-free optimizer state: a checkpoint's `mcore_state/hf_optimizer/`, from which a run resumes at
another tp / pp / vpp / ep / etp than the one that saved it (checkpoint.py decides when).

    hf_optimizer/                    rank 0 writes it, the whole folder renamed into place at once
      meta.pt                        optimizer class, param_groups (hyperparameters, no params),
                                     per trainable tensor (HF name): its group and scalar state (step);
                                     tensor_keys; or `problem`: why this state cannot be resharded
      exp_avg/model.safetensors      one HF folder per per-parameter state tensor (AdamW: exp_avg,
      exp_avg_sq/model.safetensors   exp_avg_sq): full tensors in HF names and HF shapes, as
      master/model.safetensors       `save_pretrained` writes weights; fp32 masters (mixed precision)
      param/model.safetensors        trainable tensors outside the megatron chunks (LoRA adapters, by
                                     parameter name, HF shapes already): their values (other folders
                                     hold their states under the same names)

The exporter writes those folders from the shards with the architecture's rules (`export_plan` /
`iter_hf_tensors` over the optimizer's tensors in place of the parameters); loading cuts each rank's
shard with the loader's `rule.load`, as for weights: one rule table serves weights and optimizer state.
The parameters come from the checkpoint's HF folder (the fp32 masters from `master/` where present, so
they come back exactly), the hyperparameters and step from meta.pt.

Refused with TrainingError (cause and fix): another model (names or shapes differ), another optimizer
class, another set of trainable tensors or parameter groups, and optimizer state that is not shaped
like its parameter (factored states, e.g. Adafactor): those resume at the saved layout only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.distributed as dist

from ..conversion.binding import BoundParam
from ..conversion.exporter import export_plan, iter_hf_tensors
from ..conversion.loader import check_checkpoint
from ..conversion.reader import INDEX_FILE, SINGLE_FILE, CheckpointReader
from ..conversion.writer import commit_folder, temporary_sibling, write_hf_folder
from ..errors import CheckpointError
from ..runtime.parallel import global_rank, several_processes
from .errors import TrainingError

RESHARD_DIR = "hf_optimizer"  # inside the checkpoint's mcore_state/
META_FILE = "meta.pt"
MASTER_KEY = "master"
PARAM_KEY = "param"


# ---- collectives ---------------------------------------------------------------------------------


def _all_gather(obj) -> list:
    if not several_processes():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _first_problem(problem: Optional[str]) -> Optional[str]:
    """Collective: the lowest rank's problem, or None when no rank found one (the same on every rank)."""
    return next((p for p in _all_gather(problem) if p is not None), None)


def _raise_everywhere(problem: Optional[str]) -> None:
    """Collective: raise TrainingError on every rank when any rank found a problem (no rank left waiting)."""
    problem = _first_problem(problem)
    if problem is not None:
        raise TrainingError(problem)


def _merge_on_rank0(part: dict) -> dict:
    """Collective: every rank's dict merged on rank 0 (the lowest rank's entry wins); {} on other ranks."""
    if several_processes():
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(part, parts, dst=0)
    else:
        parts = [part]
    merged: dict = {}
    for gathered in parts or []:
        for name, value in gathered.items():
            merged.setdefault(name, value)
    return merged


def _inner(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _class_name(optimizer) -> str:
    cls = type(_inner(optimizer))
    return f"{cls.__module__}.{cls.__qualname__}"


# ---- what the optimizer steps, and under which layout-free name ----------------------------------


@dataclass(frozen=True)
class _StateOf(BoundParam):
    """A bound parameter whose exported tensor is one of its optimizer states (or its fp32 master):
    the exporter reads `param`, so the rules export it exactly as they export the weight."""

    value: Optional[torch.Tensor] = None

    @property
    def param(self) -> torch.Tensor:
        return self.value


def _state_of(item: BoundParam, value: torch.Tensor) -> _StateOf:
    return _StateOf(**{f.name: getattr(item, f.name) for f in fields(BoundParam)}, value=value)


@dataclass(eq=False)
class _Trainable:
    param: torch.Tensor
    target: torch.Tensor  # what the optimizer steps: the parameter, or its fp32 master
    item: Optional[BoundParam]  # None: a tensor outside the megatron chunks (a LoRA adapter)
    name: str  # layout-free: the first HF name (an expert's slice of a stacked tensor: name#expert), or the parameter name
    group: Optional[int]  # index of its optimizer param group


def _state_name(item: BoundParam) -> str:
    name = item.hf_names[0]
    return f"{name}#{item.expert}" if item.rule.stacked else name


def _trainables(model, trained, optimizer, grads) -> list[_Trainable]:
    groups = {}
    if optimizer is not None:
        for index, group in enumerate(_inner(optimizer).param_groups):
            for p in group["params"]:
                groups.setdefault(id(p), index)
    bound_of = {id(item.param): item for item in model._bound if not item.is_buffer}
    names = {id(p): n for n, p in trained.named_parameters()}
    result = []
    for param, target in zip(grads.params, grads.targets):
        item = bound_of.get(id(param))
        name = _state_name(item) if item is not None else names[id(param)]
        result.append(_Trainable(param, target, item, name, groups.get(id(target))))
    return result


# ---- saving --------------------------------------------------------------------------------------


def _local_problem(entries: list[_Trainable], state: dict) -> tuple[Optional[str], set]:
    keys = set()
    for entry in entries:
        for key, value in state.get(entry.target, {}).items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            if tuple(value.shape) != tuple(entry.target.shape) or value.dtype != entry.target.dtype:
                return (
                    f"its state {key!r} of {entry.name} is {value.dtype} {list(value.shape)}, not shaped like the "
                    f"parameter ({entry.target.dtype} {list(entry.target.shape)})"
                ), keys
            keys.add(key)
    return None, keys


def save_layout_free_state(target: str, model, trained, optimizer, grads, format_version: int) -> None:
    """Collective: write the layout-free folder `target` on rank 0, atomically (beside, then renamed).

    Each per-parameter state tensor goes through the exporter as if it were the weight (`_StateOf`):
    TP shards are gathered and un-fused by the rules, pipeline stages and expert ranks send theirs.
    When the state cannot be laid out this way, meta.pt records why (a resume at another layout then
    says so) and the checkpoint's per-position files still resume it at the saved layout.
    """
    rank0 = global_rank() == 0
    entries = _trainables(model, trained, optimizer, grads)
    state = _inner(optimizer).state if optimizer is not None else {}
    problem, keys = _local_problem(entries, state) if optimizer is not None else ("there is no optimizer", set())
    if problem is None:
        unstepped = [e.name for e in entries if e.group is None]
        if unstepped:
            problem = f"the optimizer does not step {unstepped[:3]}"
    gathered = _all_gather((problem, sorted(keys)))
    problem = next((p for p, _ in gathered if p is not None), None)
    keys = sorted({key for _, ks in gathered for key in ks})
    if problem is None:
        incomplete = [e.name for e in entries if state.get(e.target) and not all(k in state[e.target] for k in keys)]
        problem = _first_problem(f"{incomplete[:3]} lack some of the states {keys}" if incomplete else None)

    meta: dict = {"format_version": format_version, "problem": problem}
    tmp = temporary_sibling(target) if rank0 else None
    try:
        if problem is None:
            exported = [e for e in entries if e.item is not None and e.item.rule.exported]
            extras = [e for e in entries if e.item is None]
            stepped = [e for e in entries if state.get(e.target)]
            sets = {key: [(e, state[e.target][key]) for e in stepped] for key in keys}
            if grads.masters:
                sets[MASTER_KEY] = [(e, e.target) for e in entries]
            if any(_all_gather(bool(extras))):
                sets[PARAM_KEY] = [(e, e.param) for e in extras]
            exported_ids = {id(e) for e in exported}
            for key, values in sets.items():
                bound = [_state_of(e.item, v.detach()) for e, v in values if id(e) in exported_ids]
                named = {e.name: v for e, v in values if e.item is None}
                _write_tensors(os.path.join(tmp, key) if rank0 else None, model, bound, named)
            described = {
                e.name: {"group": e.group, "stepped": bool(state.get(e.target)), "extra": e.item is None,
                         "scalars": _scalars(state.get(e.target, {}))}
                for e in exported + extras
            }
            merged = _merge_on_rank0(described)
            inner = _inner(optimizer)
            meta.update(
                optimizer=_class_name(inner),
                param_groups=[{k: v for k, v in g.items() if k != "params"} for g in inner.state_dict()["param_groups"]],
                tensor_keys=keys,
                masters=bool(grads.masters),
                entries=dict(sorted(merged.items())),
            )
        if rank0:
            torch.save(meta, os.path.join(tmp, META_FILE))
            commit_folder(tmp, target)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _scalars(state: dict) -> dict:
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in state.items()
            if not torch.is_tensor(v) or v.dim() == 0}


def _write_tensors(target: Optional[str], model, bound: list, extras: dict) -> None:
    """Collective: the HF tensors of `bound` (states dressed as parameters) plus `extras` (by name), written
    on rank 0 as one HF safetensors folder at `target` (None on other ranks)."""
    plan = export_plan(bound, model.shard_layout)
    stream = iter_hf_tensors(bound, model.shard_layout, plan, to="rank0")
    merged = _merge_on_rank0({name: t.detach().cpu() for name, t in extras.items()})
    if target is None:
        for _ in stream:
            pass
        return
    specs = [(n, s, e.dtype) for e in plan for n, s in zip(e.names, e.shapes)]
    specs += [(name, tuple(t.shape), t.dtype) for name, t in merged.items()]
    if not specs:
        return

    def tensors():
        yield from stream
        yield from merged.items()

    write_hf_folder(target, tensors(), specs, "5GB", None, lambda _: None)


# ---- loading -------------------------------------------------------------------------------------


def read_meta(state_dir: str) -> Optional[dict]:
    """The layout-free folder's meta.pt, or None when the folder has none (older format, or incomplete)."""
    path = os.path.join(state_dir, META_FILE)
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _open(folder: str) -> CheckpointReader:
    try:
        return CheckpointReader(folder)
    except CheckpointError as err:
        raise TrainingError(f"The training state is incomplete: {err}") from None


def _checked(bound: list, reader: CheckpointReader, layout, what: str) -> None:
    """Collective: every tensor of `bound` is in `reader` with the shape this model implies."""
    try:
        check_checkpoint(bound, reader, layout)
    except CheckpointError as err:
        raise TrainingError(
            f"Cannot resume: {what} does not fit this model. {err} Was the checkpoint written for another model? "
            "Resume with the model (config) it was trained from."
        ) from None


def _shard(item: BoundParam, reader: CheckpointReader, layout) -> torch.Tensor:
    """This rank's shard of `item` from an HF-named folder: the loader's rule, as for weights."""
    return item.rule.load(item.rule.view(reader, item.expert), item.hf_names, layout)


def _extras(model, trained) -> list[tuple[str, torch.Tensor]]:
    """Trainable parameters outside the megatron chunks (LoRA adapters), by name."""
    in_chunks = {id(item.param) for item in model._bound}
    return [(n, p) for n, p in trained.named_parameters() if p.requires_grad and id(p) not in in_chunks]


def _read_named(reader: CheckpointReader, named: list, what: str) -> Optional[str]:
    """Problem text when a named tensor is missing or shaped differently; None when all fit."""
    wrong = [n for n, t in named if n not in reader or tuple(reader.shape(n)) != tuple(t.shape)]
    if wrong:
        return (
            f"Cannot resume: {what} lacks (or has other shapes for) {wrong[:3]}. Was it written for another model "
            "or another adapter setup (target modules, rank)? Resume with the setup it was trained with."
        )
    return None


@torch.no_grad()
def load_model(folder: str, state_dir: str, meta: dict, model, trained) -> None:
    """Collective: this rank's parameters from the checkpoint `folder`'s HF weights (fp32 masters and adapters
    from the layout-free folder `state_dir`), cut for this model's layout."""
    layout = model.shard_layout
    trainable = {id(p) for p in trained.parameters() if p.requires_grad}
    bound = list(model._bound)
    has_weights = any(os.path.isfile(os.path.join(folder, f)) for f in (SINGLE_FILE, INDEX_FILE))
    if not has_weights:
        trained_own = [item.rule.mcore for item in bound if id(item.param) in trainable]
        _raise_everywhere(
            f"Cannot resume: {folder} holds no HF model weights (an adapter checkpoint?), but this model trains its "
            f"own parameters ({trained_own[:3]}). Resume with the PEFT setup the checkpoint was trained with."
            if trained_own else None
        )
        bound = []  # an adapter checkpoint: the frozen base model is the one the caller loaded
    with contextlib.ExitStack() as readers:
        if bound:
            weights = readers.enter_context(_open(folder))
            _checked(bound, weights, layout, f"the HF model in {folder}")
            masters = None
            master_dir = os.path.join(state_dir, MASTER_KEY)
            own = [item for item in bound if id(item.param) in trainable]
            if meta.get("masters") and os.path.isdir(master_dir) and own:
                # fp32: parameters in fp32 come back exactly, not via bf16
                masters = readers.enter_context(_open(master_dir))
                _checked(own, masters, layout, f"{master_dir}")
            for item in bound:
                source = masters if masters is not None and id(item.param) in trainable else weights
                item.param.copy_(_shard(item, source, layout))
        extras = _extras(model, trained)
        problem = None
        if any(_all_gather(bool(extras))):
            values = readers.enter_context(_open(os.path.join(state_dir, PARAM_KEY)))
            problem = _read_named(values, extras, f"{state_dir}/{PARAM_KEY}")
            if problem is None:
                for name, param in extras:
                    param.copy_(values.read(name))
        _raise_everywhere(problem)


def _optimizer_problem(folder: str, meta: dict, inner, entries: list[_Trainable]) -> Optional[str]:
    """Collective (gathers the trained names): why this run's optimizer cannot take the saved state, or None."""
    saved = meta["entries"]
    problem = None
    if meta["optimizer"] != _class_name(inner):
        problem = (
            f"Cannot resume from {folder}: its optimizer state is {meta['optimizer']}'s, this run's optimizer is "
            f"{_class_name(inner)}. Resume with the same `optim` (or optimizer) the checkpoint was trained with."
        )
    elif len(meta["param_groups"]) != len(inner.param_groups):
        problem = (
            f"Cannot resume from {folder}: it has {len(meta['param_groups'])} optimizer parameter groups, this run has "
            f"{len(inner.param_groups)}. Build the optimizer as the checkpoint's run did."
        )
    current = {e.name for e in entries if e.item is None or e.item.rule.exported}
    everywhere = set().union(*_all_gather(current))
    if problem is None and everywhere != set(saved):
        problem = (
            f"Cannot resume from {folder}: it trained other tensors than this run (missing here: "
            f"{sorted(set(saved) - everywhere)[:3]}, new here: {sorted(everywhere - set(saved))[:3]}). Was it written "
            "for another model, another PEFT setup, or other frozen parameters? Resume with the setup it was trained with."
        )
    if problem is None:
        moved = [e.name for e in entries if e.name in saved and saved[e.name]["group"] != e.group]
        if moved:
            problem = (
                f"Cannot resume from {folder}: {moved[:3]} are in other optimizer parameter groups than in the checkpoint "
                "(e.g. another weight-decay rule). Build the optimizer as the checkpoint's run did."
            )
    return problem


def load_optimizer(folder: str, state_dir: str, meta: dict, model, trained, optimizer, grads) -> None:
    """Collective: rebuild this rank's optimizer state_dict (and fp32 masters) from the layout-free folder
    `state_dir` through the rules; `folder` (the checkpoint) names it in refusals."""
    if optimizer is None or grads is None:
        return
    inner = _inner(optimizer)
    layout = model.shard_layout
    entries = _trainables(model, trained, optimizer, grads)
    saved = meta["entries"]
    _raise_everywhere(_optimizer_problem(folder, meta, inner, entries))

    stepped = [e for e in entries if saved[e.name]["stepped"]]
    keys = list(meta["tensor_keys"])
    if meta.get("masters") and grads.masters:
        keys.append(MASTER_KEY)
    loaded: dict = {id(e.target): {} for e in entries}
    with contextlib.ExitStack() as readers:
        for key in keys:
            wanted = entries if key == MASTER_KEY else stepped
            reader = readers.enter_context(_open(os.path.join(state_dir, key)))
            _checked([e.item for e in wanted if e.item is not None], reader, layout, f"{state_dir}/{key}")
            named = [(e.name, e.target) for e in wanted if e.item is None]
            _raise_everywhere(_read_named(reader, named, f"{state_dir}/{key}") if named else None)
            for e in wanted:
                tensor = _shard(e.item, reader, layout) if e.item is not None else reader.read(e.name)
                loaded[id(e.target)][key] = tensor.to(device=e.target.device, dtype=e.target.dtype).clone()

    index_of: dict = {}
    for group in inner.param_groups:
        for p in group["params"]:
            index_of.setdefault(id(p), len(index_of))
    state = {}
    for e in stepped:
        values = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in saved[e.name]["scalars"].items()}
        values.update({k: v for k, v in loaded[id(e.target)].items() if k != MASTER_KEY})
        state[index_of[id(e.target)]] = values
    current_groups = inner.state_dict()["param_groups"]
    groups = [dict(saved_group, params=group["params"]) for saved_group, group in zip(meta["param_groups"], current_groups)]
    inner.load_state_dict({"state": state, "param_groups": groups})
    if MASTER_KEY in keys:
        with torch.no_grad():
            for e in entries:
                e.target.copy_(loaded[id(e.target)][MASTER_KEY])
