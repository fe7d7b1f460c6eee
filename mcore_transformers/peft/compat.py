"""Keep peft's transformers-5 MoE conversion away from megatron-core models.

With transformers >= 5, peft rewrites the LoRA config of MoE families whose experts transformers
now holds fused (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]):
`target_modules` gate_proj / up_proj / down_proj become `target_parameters` on the fused tensors,
and per-expert adapter keys (`...mlp.experts.3.gate_proj.lora_A.weight`) are folded into fused,
block-diagonal tensors (peft.utils.transformers_weight_conversion). It decides by
`model.config.model_type` alone, so it would do the same on `MCoreModelForCausalLM`, whose LoRA
view has one HF-named module per expert and projection — exactly the per-expert (transformers 4,
vLLM) naming those conversions translate away from. For megatron-core models both conversions are
therefore skipped: per-expert names and keys load as they are. Every other model goes through
peft's own code unchanged.

The same hook keeps peft's matching off megatron's own modules (under `chunks.`): `target_modules` that
name megatron's linears are refused with the fix (`hf_target_modules`), and where such a name is also an HF
name of the model (`linear_fc1` is Qwen3-VL's vision MLP too) megatron's modules are excluded from matching.

peft imports that module lazily (inside the functions that use it), so the guard is installed
when it is first imported (an import hook costing nothing until then), or at once when it already is.
Experts stacked on disk too (granitemoe) have per-expert slots that transformers holds as parameters: the hook
keeps module matching off them and refuses their names in target_modules, as peft reaches them only through
target_parameters.

An adapter that itself uses `target_parameters` (one made with peft on transformers 5's fused
experts) is read as the per-expert adapter it is instead (`fused`), or refused with AdapterError
before peft creates any layer.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

from torch import nn

from .view import find_view


CONVERSION_MODULE = "peft.utils.transformers_weight_conversion"
MEGATRON_MODULES = r"chunks\..*"  # the facade's megatron-core modules (peft's exclude_modules: a full-match regex)


def mcore_model(model):
    """The megatron model with the LoRA view that `model` is or wraps (PeftModel, LoRA tuner), else None."""
    for _ in range(4):
        if not isinstance(model, nn.Module):
            return None
        if find_view(model) is not None:
            return model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "model", None)
        if inner is model:
            return None
        model = inner
    return None


def is_mcore_model(model) -> bool:
    return mcore_model(model) is not None


def _guard(module) -> None:
    if getattr(module, "_mcore_transformers_guarded", False):
        return
    convert_config = module.convert_peft_config_for_transformers
    convert_state = module.convert_peft_adapter_state_dict_for_transformers

    @functools.wraps(convert_config)
    def convert_peft_config_for_transformers(peft_config, model, *args, **kwargs):
        mcore = mcore_model(model)
        if mcore is None:
            return convert_config(peft_config, model, *args, **kwargs)
        _keep_off_megatron_modules(peft_config, mcore)
        if not getattr(peft_config, "target_parameters", None):
            _keep_off_parameter_slots(peft_config, mcore)
        if getattr(peft_config, "target_parameters", None):  # fused experts -> their per-expert projections
            from .fused import convert_config as per_expert_config

            per_expert_config(peft_config, mcore, mcore.language_config.num_hidden_layers)
        return None  # per-expert names are this model's own module names

    @functools.wraps(convert_state)
    def convert_peft_adapter_state_dict_for_transformers(model, *args, **kwargs):
        mcore = mcore_model(model)
        if mcore is None:
            return convert_state(model, *args, **kwargs)
        state = kwargs.get("adapter_state_dict", args[1] if len(args) > 1 else None)
        from .fused import convert_state as per_expert_state, is_fused_state

        if state and is_fused_state(state):
            return per_expert_state(mcore, state, mcore.shard_layout.num_experts)
        return state

    module.convert_peft_config_for_transformers = convert_peft_config_for_transformers
    module.convert_peft_adapter_state_dict_for_transformers = convert_peft_adapter_state_dict_for_transformers
    module._mcore_transformers_guarded = True


def _keep_off_megatron_modules(peft_config, model) -> None:
    """Listed target_modules that name megatron's linears: refused with the fix when they are not also HF names of
    this model; when they are (Qwen3-VL's vision MLP is `linear_fc1` / `linear_fc2`, like megatron's MLP), megatron's
    modules are excluded (`exclude_modules`, unless the config sets its own) so that only the HF-named ones match."""
    targets = getattr(peft_config, "target_modules", None)
    if not isinstance(targets, (list, set, tuple)):
        return
    view = find_view(model)
    known = view.projection_names()
    megatron = {host.name.rsplit(".", 1)[-1] for host in view.hosts} & set(targets)
    misnamed = sorted(megatron - known)
    if misnamed:
        from .errors import AdapterError

        raise AdapterError(
            f"target_modules {misnamed} are megatron-core's linear names; LoRA targets are named as in transformers "
            f"({sorted(known)}). Translate them with mcore_transformers.peft.hf_target_modules(model, {misnamed})."
        )
    if megatron and getattr(peft_config, "exclude_modules", None) is None:
        peft_config.exclude_modules = MEGATRON_MODULES


def _keep_off_parameter_slots(peft_config, model) -> None:
    """Experts stacked on disk too (granitemoe) are parameters in transformers, which peft adapts only through
    `target_parameters`: naming them in target_modules is refused with that fix, and other module matching
    ("all-linear", a regex) is kept off their per-expert slots (`exclude_modules`), as on the HF model."""
    slots = find_view(model).parameter_slots
    if not slots:
        return
    leaves = list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in slots))  # gate_up_proj, down_proj
    targets = getattr(peft_config, "target_modules", None)
    if isinstance(targets, (list, set, tuple)) and set(targets) & set(leaves):
        from .errors import AdapterError

        raise AdapterError(
            f"target_modules {sorted(set(targets) & set(leaves))}: this model's routed experts are stacked tensors in "
            f"transformers (no per-expert modules), which peft adapts only as parameters. Pass "
            f"target_parameters={leaves} instead (one LoRA per expert, as HF peft makes it)."
        )
    excluded = getattr(peft_config, "exclude_modules", None)
    if excluded is None or isinstance(excluded, str):
        pattern = r"(?:.*\.)?experts\.\d+\.(?:" + "|".join(leaves) + ")"
        peft_config.exclude_modules = pattern if excluded is None else f"(?:{excluded})|(?:{pattern})"
    else:
        peft_config.exclude_modules = sorted(set(excluded) | set(slots))


class _GuardingLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _guard(module)


class _GuardOnImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of peft's conversion module so the guard is installed as it is imported."""

    def __init__(self):
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != CONVERSION_MODULE or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _GuardingLoader(spec.loader)
        return spec


def install_conversion_guard() -> None:
    """Idempotent and cheap: guards the module now if it is loaded, else as soon as peft imports it."""
    module = sys.modules.get(CONVERSION_MODULE)
    if module is not None:
        _guard(module)
        return
    if not any(isinstance(finder, _GuardOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _GuardOnImport())
