"""peft's LoRA `Linear`, adopted for an HF projection whose base weight lives inside a megatron linear.

peft builds its stock `lora.Linear` around a `ProjectionSlot` (an `nn.Linear` to peft's dispatch):
that gives peft's own adapter bookkeeping — named adapters, `set_adapter`, dropout, `lora_alpha`,
rslora, rank/alpha patterns, enable/disable, state-dict keys, loading — with HF's parameter shapes.
When peft puts that layer into the view, `adopt` checks it and turns it into a `ProjectionLora`,
which changes only what must differ: merging writes into this rank's part of the megatron weight,
the output is computed by the megatron linear (`host.LoraHost`), the tensor-parallel replicas start
equal, and a checkpoint for a different base model is refused with the shapes that disagree.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from peft import PeftType
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .errors import AdapterError
from .slots import ProjectionSlot

# init_lora_weights values that read or rewrite the base weight (or need a data pass) at creation.
UNSUPPORTED_INITS = ("pissa", "olora", "corda", "loftq", "eva", "orthogonal", "lora_ga", "mica")
# LoraConfig fields that select a LoRA variant (a different forward than B·A·x).
VARIANT_FIELDS = {
    "use_dora": "DoRA (use_dora=True)",
    "use_qalora": "QALoRA (use_qalora=True)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
}
SUPPORTED = (
    "Supported: plain LoRA (r, lora_alpha, lora_dropout, use_rslora, rank_pattern/alpha_pattern, "
    "init_lora_weights True/False/'gaussian') with bias='none' and no modules_to_save — which is also what vLLM serves."
)


def check_lora_config(
    config, adapter: str, projection_names: Optional[Iterable[str]] = None, unplaced: Optional[dict] = None
) -> None:
    """Raise AdapterError naming every option of `config` megatron-core LoRA cannot honour."""
    if getattr(config, "peft_type", None) != PeftType.LORA:
        raise AdapterError(f"Adapter {adapter!r} is {getattr(config, 'peft_type', None)}; only LoRA is supported.")
    problems = [label for field, label in VARIANT_FIELDS.items() if getattr(config, field, None)]
    if getattr(config, "bias", "none") != "none":
        problems.append(f"bias={config.bias!r} (trains the base model's biases)")
    if getattr(config, "lora_bias", False):
        problems.append("lora_bias=True")
    if getattr(config, "modules_to_save", None):
        problems.append(f"modules_to_save={list(config.modules_to_save)}")
    if getattr(config, "trainable_token_indices", None):
        problems.append("trainable_token_indices")
    if getattr(config, "layer_replication", None):
        problems.append("layer_replication")
    if getattr(config, "target_parameters", None):
        problems.append(f"target_parameters={list(config.target_parameters)}")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(UNSUPPORTED_INITS):
        problems.append(f"init_lora_weights={init!r} (it reads or rewrites the base weight)")
    if problems:
        raise AdapterError(
            f"LoRA adapter {adapter!r} uses {'; '.join(problems)}, which LoRA on megatron-core models does not support. "
            + SUPPORTED
        )
    targets = getattr(config, "target_modules", None)
    if projection_names is not None and isinstance(targets, (list, set, tuple)):
        known = set(projection_names)
        unknown = sorted({t for t in targets if t.rsplit(".", 1)[-1] not in known})
        if unknown:
            raise AdapterError(
                f"LoRA adapter {adapter!r} targets {unknown}, which this model cannot adapt: LoRA runs on the "
                f"decoder projections {sorted(known)}. (An adapter that also adapts e.g. lm_head or embed_tokens "
                "would load only in part and give wrong outputs, so it is refused.)"
                + "".join(f" No LoRA on {linear}: {why}" for linear, why in (unplaced or {}).items())
            )


def _check_layer(layer: LoraLinear, adapters: Iterable[str], path: str) -> None:
    for adapter in adapters:
        if adapter in layer.lora_variant or layer.use_dora.get(adapter):
            variant = type(layer.lora_variant[adapter]).__name__ if adapter in layer.lora_variant else "Dora"
            variant = {"Dora": "DoRA", "ALora": "aLoRA"}.get(variant.removesuffix("LinearVariant"), variant)
            raise AdapterError(
                f"LoRA adapter {adapter!r} on {path} uses a LoRA variant ({variant}), which LoRA on megatron-core "
                f"models does not support. {SUPPORTED}"
            )
        if layer.lora_bias.get(adapter):
            raise AdapterError(f"LoRA adapter {adapter!r} on {path} uses lora_bias=True, which is not supported. {SUPPORTED}")


def adopt(layer: nn.Module) -> nn.Module:
    """Turn the LoRA layer peft built around a ProjectionSlot into a ProjectionLora (or refuse it)."""
    if isinstance(layer, ProjectionLora):  # built directly (config._register_custom_module({ProjectionSlot: ProjectionLora}))
        layer.host.install()
        return layer
    slot = layer.get_base_layer() if hasattr(layer, "get_base_layer") else getattr(layer, "original_module", None)
    path = slot.projection.path if isinstance(slot, ProjectionSlot) else type(layer).__name__
    if type(layer) is not LoraLinear:
        raise AdapterError(
            f"peft put a {type(layer).__module__}.{type(layer).__name__} on {path}: only LoRA layers (not other peft "
            f"methods, modules_to_save or quantized LoRA) can run on megatron-core models. {SUPPORTED}"
        )
    if not isinstance(slot, ProjectionSlot):
        raise AdapterError(f"peft put a LoRA layer on {path}, which is not an HF projection of this model.")
    if slot.unsupported:
        raise AdapterError(f"Cannot put LoRA on {path}: {slot.unsupported}")
    _check_layer(layer, list(layer.lora_A), path)
    layer.__class__ = ProjectionLora  # same state, our merge/forward/loading (no new attributes are added)
    slot.host.install()
    layer.sync_replicas(list(layer.lora_A))
    return layer


class ProjectionLora(LoraLinear):
    """peft's LoRA Linear for one HF projection computed inside a megatron linear.

    Holds HF's full A [r, in] and B [out, r] (replicated over the linear's tensor-parallel group);
    the megatron linear uses this rank's rows or columns of them. Never called directly.
    """

    is_mcore_projection_lora = True

    @property
    def host(self):
        return self.get_base_layer().host

    @property
    def projection(self):
        return self.get_base_layer().projection

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        """A further adapter on this projection: checked before peft creates it."""
        check_lora_config(config, adapter_name)
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        _check_layer(self, [adapter_name], self.projection.path)
        self.sync_replicas([adapter_name])

    @torch.no_grad()
    def sync_replicas(self, adapters: list[str]) -> None:
        """Make every replica of these adapters equal: over the linear's tensor-parallel group, then its
        data-parallel group (the rank first in both wins), so a random init agrees whatever the seeds."""
        if not dist.is_initialized():
            return
        for group in self.host.replica_groups():
            source = dist.get_global_rank(group, 0)
            for adapter in adapters:
                weights = [self.lora_A[adapter].weight, self.lora_B[adapter].weight]
                if any(w.is_meta for w in weights):
                    continue
                flat = torch.cat([w.reshape(-1) for w in weights])
                dist.broadcast(flat, src=source, group=group)
                offset = 0
                for w in weights:
                    w.copy_(flat[offset : offset + w.numel()].view_as(w))
                    offset += w.numel()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add B·A·scaling (HF's delta, computed in full) into this rank's part of the megatron weight."""
        self.host.view.check_configs()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.lora_A:
                self.host.add_to_weight(self.projection, self.get_delta_weight(adapter), check_finite=safe_merge)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self.host.add_to_weight(self.projection, -self.get_delta_weight(adapter))

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"{self.projection.path}'s LoRA is computed inside the megatron linear {self.host.name}: call the model."
        )

    def register_forward_pre_hook(self, hook, *, prepend=False, with_kwargs=False):
        # peft registers pre-hooks on LoRA layers only to pass per-row adapter choices (adapter_names=,
        # alora_offsets=) into their forward; these layers have no forward of their own.
        raise AdapterError(
            "Per-row adapter selection (adapter_names=... / alora_offsets=...) is not supported on megatron-core "
            "models: use set_adapter() to choose the active adapter(s) for the whole batch."
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for kind, layers in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            for adapter, layer in layers.items():
                key = f"{prefix}{kind}.{adapter}.weight"
                if key in state_dict and tuple(state_dict[key].shape) != tuple(layer.weight.shape):
                    out_features, in_features = self.projection.shape
                    raise AdapterError(
                        f"The adapter does not fit this model: {self.projection.path}.{kind}.weight has shape "
                        f"{list(state_dict[key].shape)}, but {self.projection.name} here is [{out_features}, "
                        f"{in_features}] (out, in) with r={self.r[adapter]}, which needs {list(layer.weight.shape)}. "
                        "The adapter was trained for a different base model (see base_model_name_or_path in its "
                        "adapter_config.json), or its weights do not match its config's r."
                    )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
