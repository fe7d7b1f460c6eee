"""LoRA on mixture-of-experts models: attention LoRA under expert parallelism, per-expert LoRA on the
routed (and shared) experts, exported in per-expert HF naming, transformers-5 fused-expert adapters
read per expert, and the refusals.

One torchrun launch (2 ranks, tests/dist_lora_moe_worker.py) runs every case at ep=1, tp=2 (etp=2),
ep=2 and tp=2 + ep=2 (etp=1). The oracles: HF peft for attention and fused-expert adapters; for
per-expert adapters the HF model with W_e + scaling·B_e·A_e merged per expert in fp32 (transformers 5
has no per-expert modules; gradients by autograd through those merged weights), and also HF peft
itself, whose transformers-5 conversion folds per-expert adapters into the fused expert tensors
(qwen3_moe).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_lora_moe_worker import (  # noqa: E402
    ALPHA, ATTENTION, CASES, EVAL_ONLY, EXPORT_TARGETS, HF_ADAPTER_PARAMETERS, HF_ADAPTER_TARGETS, LAYOUTS, RANKS, R,
    adapter_deltas, adapter_path,
    expert_adapter_targets, hf_projection_shapes, make_inputs, merge_into_hf, merged_reference, prepare,
    reference_gradients,
)
from dist_lora_worker import case_record, hf_logits, parametrize_cases, read_safetensors  # noqa: E402
from launching import launch  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_lora_moe_worker.py")
LAUNCH_TIMEOUT_S = 300
LOGITS_TOL = 1e-4  # fp32
GRAD_TOL = 1e-4  # relative to the largest gradient of the tensor
# glm4_moe_lite (MLA, small latents): the fp32 oracle's own gradients are up to 8e-5 off a float64 run of it,
# ours 4e-5 (measured); differences between the two reach 1.1e-4.
FAMILY_GRAD_TOL = {"glm4_moe_lite": 2e-4}
MERGE_TOL = 1e-6  # merged weights: the same fp32 sum, B·A computed in a different order
NUM_EXPERTS = 4  # qwen3_moe's, qwen2_moe's
# the shared experts' and the dense layer's MLP, adapted beside the routed experts
SHARED_AND_DENSE = {
    "qwen2_moe": (".mlp.shared_expert.gate_proj.", ".layers.1.mlp.down_proj."),
    "glm4_moe": (".mlp.shared_experts.gate_proj.", ".layers.0.mlp.down_proj."),
    "glm4_moe_lite": (".mlp.shared_experts.gate_proj.", ".layers.0.mlp.down_proj."),
}
# the per-expert HF names of the routed experts' projections, where the checkpoint's differ from gate/up/down_proj
# (granitemoe: no per-expert names on disk either; its per-expert slots are the stacked tensors' slices)
EXPERT_PROJECTIONS = {"minimax_m2": {"w1", "w2", "w3"}, "phimoe": {"w1", "w2", "w3"},
                      "granitemoe": {"gate_up_proj", "down_proj"}}


cases = functools.partial(parametrize_cases, CASES)


@pytest.fixture(scope="session")
def moe_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("lora-moe-inputs"))
    prepare(root)
    return root


@pytest.fixture(scope="session")
def moe_launch(moe_root, tmp_path_factory):
    """Runs the worker once (every case, every layout); returns (output folder, log)."""
    out = str(tmp_path_factory.mktemp("lora-moe"))
    _, log = launch(WORKER, [moe_root, out], RANKS, LAUNCH_TIMEOUT_S, os.path.join(out, "worker.log"))
    return out, log


def record(moe_launch, case, rank: int = 0) -> dict:
    out, log = moe_launch
    return case_record(out, case, rank, log)


# ---- the oracle ---------------------------------------------------------------------------------
def hf_base(root, checkpoint: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.join(root, checkpoint), dtype=torch.float32).eval()


def hf_peft(root, checkpoint: str, adapter_folder: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_base(root, checkpoint), adapter_folder).eval()


# Cached: several cases share a checkpoint and adapter, and HF loads dominate this file's time.
@functools.lru_cache(maxsize=None)
def base_logits(root, checkpoint: str) -> torch.Tensor:
    model = hf_base(root, checkpoint)
    return hf_logits(model, model.config.vocab_size)


@functools.lru_cache(maxsize=None)
def peft_logits(root, checkpoint: str, adapter_folder: str) -> torch.Tensor:
    model = hf_peft(root, checkpoint, adapter_folder)
    return hf_logits(model, model.config.vocab_size)


@functools.lru_cache(maxsize=None)
def reference_outputs(root, checkpoint: str, adapter_folder: str) -> tuple[torch.Tensor, float]:
    """Logits and loss of the HF model with the adapter merged per expert (fp32)."""
    model = merged_reference(os.path.join(root, checkpoint), adapter_folder)
    batch = make_inputs(model.config.vocab_size)
    with torch.no_grad():
        result = model(**batch)
    return result.logits, result.loss.item()


@functools.lru_cache(maxsize=None)
def cached_reference_gradients(root, checkpoint: str, adapter_folder: str) -> dict:
    from transformers import AutoConfig

    folder = os.path.join(root, checkpoint)
    return reference_gradients(folder, adapter_folder, make_inputs(AutoConfig.from_pretrained(folder).vocab_size))[1]


def logits_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    valid = make_inputs(expected.shape[-1])["attention_mask"].bool()
    return (actual - expected)[valid].abs().max().item()


def assert_logits_close(actual, expected, what: str) -> None:
    diff = logits_diff(actual, expected)
    assert diff <= LOGITS_TOL, f"{what}: max |logits - reference| = {diff:.3g} > {LOGITS_TOL:g}"


@functools.lru_cache(maxsize=None)
def expected_adapter_keys(root, checkpoint: str, targets: tuple, r: int = R) -> dict[str, tuple[int, int]]:
    """The keys and shapes of an HF PEFT adapter in per-expert naming for these targets."""
    keys = {}
    for path, (out_features, in_features) in hf_projection_shapes(hf_base(root, checkpoint), targets).items():
        keys[f"base_model.model.{path}.lora_A.weight"] = (r, in_features)
        keys[f"base_model.model.{path}.lora_B.weight"] = (out_features, r)
    return keys


@functools.lru_cache(maxsize=None)
def num_experts(root, checkpoint: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(os.path.join(root, checkpoint))
    return next(getattr(config, key) for key in ("num_experts", "n_routed_experts", "num_local_experts")
                if getattr(config, key, None))


def checkpoint_of(case) -> str:
    return "qwen3_moe" if case.checkpoint == "qwen3_moe-stacked" else case.checkpoint


# ---- attention LoRA on a MoE model --------------------------------------------------------------
@cases("hf-logits", where=lambda case: case.adapter == "attn")
def test_attention_adapter_gives_hf_peft_logits(case, moe_launch, moe_root):
    expected = peft_logits(moe_root, case.checkpoint, adapter_path(moe_root, case.checkpoint, "attn"))
    assert (expected - base_logits(moe_root, case.checkpoint)).abs().max() > 0.05
    for rank in range(RANKS):
        assert_logits_close(record(moe_launch, case, rank)["tensors"]["logits"], expected, f"{case.id} rank {rank}")


@cases("export", where=lambda case: case.adapter == "attn")
def test_exported_attention_adapter_loads_in_hf_peft(case, moe_launch, moe_root):
    records = [record(moe_launch, case, rank) for rank in range(RANKS)]
    folder = os.path.join(records[0]["folder"], "adapter")
    tensors = read_safetensors(folder)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_adapter_keys(moe_root, case.checkpoint, tuple(ATTENTION))
    expected = peft_logits(moe_root, case.checkpoint, folder)
    for rank, result in enumerate(records):  # ranks seeded differently: the replicas were synchronised
        assert_logits_close(result["tensors"]["logits"], expected, f"{case.id} rank {rank}")


# ---- per-expert LoRA ----------------------------------------------------------------------------
@cases("hf-logits", where=lambda case: case.adapter == "experts")
def test_per_expert_adapter_equals_merged_experts(case, moe_launch, moe_root):
    checkpoint = checkpoint_of(case)
    adapter = adapter_path(moe_root, case.checkpoint, "experts")
    expected, loss = reference_outputs(moe_root, checkpoint, adapter)
    assert (expected - base_logits(moe_root, checkpoint)).abs().max() > 0.05
    records = [record(moe_launch, case, rank) for rank in range(RANKS)]
    for rank, result in enumerate(records):
        assert_logits_close(result["tensors"]["logits"], expected, f"{case.id} rank {rank}")
        if "loss" in result["tensors"]:  # one training step's backward ran (tp = 1)
            assert abs(result["tensors"]["loss"].item() - loss) < 1e-5, f"rank {rank}: loss"
            # Only an expert no token was routed to (16 experts, top-4 within 2 of 4 groups: glm4_moe) may go without
            # a gradient; its reference gradient is zero too.
            reference = cached_reference_gradients(moe_root, checkpoint, adapter)
            idle = [n.replace(".default.", ".") for n in result["info"]["no_grad"] + result["info"]["zero_grad"]]
            assert all(".mlp.experts." in n and not reference[n].any() for n in idle), f"rank {rank}: {idle[:4]}"


@cases("hf-logits", where=lambda case: case.adapter == "experts" and LAYOUTS[case.layout]["tp"] == 1)
def test_per_expert_gradients_equal_the_merged_reference(case, moe_launch, moe_root):
    """One backward: d loss / d A, B of every adapter the rank holds, against autograd through W + s·B·A in HF.

    Both ranks run the same batch. At ep = 1 each rank is a whole model, so its gradients are HF's. At ep = 2
    the experts also see the other rank's tokens (the dispatcher gathers them), so a routed expert's
    gradient is the sum over the 2 data-parallel replicas: 2 × HF's; the attention (data-parallel) ones are HF's.
    """
    checkpoint = checkpoint_of(case)
    expected = cached_reference_gradients(moe_root, checkpoint, adapter_path(moe_root, case.checkpoint, "experts"))
    ep = LAYOUTS[case.layout]["ep"]
    for rank in range(RANKS):
        grads = record(moe_launch, case, rank)["tensors"]["grads"]
        assert grads and set(grads) <= set(expected)
        if ep == 1:
            assert set(grads) == set(expected), f"rank {rank}: ep=1 holds every adapter"
        for name, grad in grads.items():
            factor = ep if ".mlp.experts." in name else 1
            scale = expected[name].abs().max().item() * factor
            diff = (grad - factor * expected[name]).abs().max().item()
            tol = FAMILY_GRAD_TOL.get(checkpoint, GRAD_TOL)
            assert diff <= tol * max(scale, 1e-6), f"rank {rank} {name}: |grad - reference| = {diff:.3g} (max {scale:.3g})"


@cases("hf-logits", where=lambda case: case.adapter == "experts")
def test_each_rank_adapts_its_own_experts(case, moe_launch, moe_root):
    """ep ranks hold experts local + (E/ep)·ep_rank and adapt exactly those, under their global names."""
    ep = LAYOUTS[case.layout]["ep"]
    for rank in range(RANKS):
        adapted = record(moe_launch, case, rank)["info"]["adapted"]
        experts = {int(m.group(1)) for m in (re.search(r"\.mlp\.experts\.(\d+)\.", n) for n in adapted) if m}
        ep_rank = rank % ep if ep > 1 else 0
        per_rank = num_experts(moe_root, checkpoint_of(case)) // ep
        assert experts == set(range(ep_rank * per_rank, (ep_rank + 1) * per_rank)), f"rank {rank}: {sorted(experts)}"
        names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapted}
        assert names == set(expert_adapter_targets(case.checkpoint))
        for part in SHARED_AND_DENSE.get(case.checkpoint, ()):  # the shared experts and the dense layer's MLP too
            assert any(part in n for n in adapted), f"rank {rank}: nothing adapted in {part}"


def test_hf_peft_loads_per_expert_adapters_like_the_merged_reference(moe_root):
    """peft 0.21 on transformers 5 folds a per-expert adapter into the fused expert tensors (target_parameters):
    the same numbers as the per-expert merge, so HF peft is a second oracle for qwen3_moe. The guard that keeps
    that conversion away from megatron models leaves HF models alone."""
    from mcore_transformers.peft.compat import install_conversion_guard

    install_conversion_guard()
    adapter = adapter_path(moe_root, "qwen3_moe", "experts")
    peft_model = hf_peft(moe_root, "qwen3_moe", adapter)
    assert set(peft_model.peft_config["default"].target_parameters) == {"gate_up_proj", "down_proj"}
    expected, _ = reference_outputs(moe_root, "qwen3_moe", adapter)
    assert_logits_close(hf_logits(peft_model, peft_model.config.vocab_size), expected, "HF peft vs per-expert merge")


@cases("export", where=lambda case: case.adapter in ("experts", "tparams"))
def test_exported_expert_adapter_uses_per_expert_hf_names(case, moe_launch, moe_root):
    records = [record(moe_launch, case, rank) for rank in range(RANKS)]
    folder = os.path.join(records[0]["folder"], "adapter")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    assert sorted(config["target_modules"]) == sorted(EXPORT_TARGETS)
    assert not config.get("target_parameters") and not config.get("rank_pattern") and not config.get("modules_to_save")
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (R, ALPHA, "CAUSAL_LM")
    tensors = read_safetensors(folder)
    # every expert of every MoE layer, gathered from both expert-parallel ranks (and shared / dense MLPs)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_adapter_keys(moe_root, case.checkpoint, tuple(EXPORT_TARGETS))
    assert any(".mlp.experts.3.down_proj." in k for k in tensors)


@cases("export", where=lambda case: case.adapter in ("experts", "tparams"))
def test_exported_expert_adapter_reproduces_the_logits(case, moe_launch, moe_root):
    records = [record(moe_launch, case, rank) for rank in range(RANKS)]
    folder = os.path.join(records[0]["folder"], "adapter")
    expected, _ = reference_outputs(moe_root, case.checkpoint, folder)
    for rank, result in enumerate(records):
        assert_logits_close(result["tensors"]["logits"], expected, f"{case.id} rank {rank} vs per-expert merge")
    if case.checkpoint == "qwen3_moe":  # HF peft itself loads the exported per-expert adapter
        assert_logits_close(records[0]["tensors"]["logits"], peft_logits(moe_root, case.checkpoint, folder),
                            f"{case.id} vs HF peft")


@cases("merge")
def test_merged_moe_checkpoint_has_the_merged_expert_weights(case, moe_launch, moe_root):
    result = record(moe_launch, case)
    assert result["info"]["merged_type"] == "MCoreModelForCausalLM" and result["info"]["lora_modules_left"] == []
    base = read_safetensors(os.path.join(moe_root, case.checkpoint))
    adapter = adapter_path(moe_root, case.checkpoint, "experts")
    saved = read_safetensors(os.path.join(result["folder"], "merged"))
    assert sorted(saved) == sorted(base)  # the checkpoint's own layout: per-expert or stacked tensors
    if case.checkpoint.endswith("-stacked"):  # experts.gate_up_proj [E, 2I, H]: the HF model's own tensors
        expected = merged_reference(os.path.join(moe_root, case.checkpoint), adapter).state_dict()
        assert any(name.endswith("mlp.experts.gate_up_proj") for name in saved)
        for name, tensor in saved.items():
            diff = (tensor - expected[name]).abs().max().item()
            assert diff <= MERGE_TOL, f"{name}: {diff:.3g}"
        return
    deltas = adapter_deltas(adapter)
    assert all(f"{path}.weight" in base for path in deltas)
    for name, tensor in saved.items():
        expected = base[name] + deltas[name.removesuffix(".weight")] if name.removesuffix(".weight") in deltas else base[name]
        diff = (tensor - expected).abs().max().item()
        assert diff <= (MERGE_TOL if name.removesuffix(".weight") in deltas else 0.0), f"{name}: {diff:.3g}"


@cases("merge")
def test_merged_moe_logits_equal_adapter_logits(case, moe_launch, moe_root):
    expected, _ = reference_outputs(moe_root, checkpoint_of(case), adapter_path(moe_root, case.checkpoint, "experts"))
    for rank in range(RANKS):
        tensors = record(moe_launch, case, rank)["tensors"]
        assert_logits_close(tensors["adapter_logits"], expected, f"rank {rank} before merge")
        assert_logits_close(tensors["merged_logits"], expected, f"rank {rank} after merge")


# ---- transformers-5 fused-expert adapters (target_parameters) ----------------------------------
@cases("hf-logits", where=lambda case: case.adapter == "fused")
def test_fused_expert_adapter_gives_hf_peft_logits(case, moe_launch, moe_root):
    """An adapter peft made on transformers 5's stacked experts (target_parameters=["down_proj", "gate_up_proj"],
    gate_up at rank 2r) is read per expert: HF peft's own logits, at ep=2, etp=2 and on a stacked checkpoint."""
    folder = adapter_path(moe_root, case.checkpoint, "fused")
    with open(os.path.join(folder, "adapter_config.json")) as f:
        assert sorted(json.load(f)["target_parameters"]) == ["down_proj", "gate_up_proj"]
    expected = peft_logits(moe_root, "qwen3_moe", folder)
    assert (expected - base_logits(moe_root, "qwen3_moe")).abs().max() > 0.05
    ep = LAYOUTS[case.layout]["ep"]
    for rank in range(RANKS):
        result = record(moe_launch, case, rank)
        assert_logits_close(result["tensors"]["logits"], expected, f"{case.id} rank {rank}")
        adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in result["info"]["adapted"]}
        experts = {int(re.search(r"\.experts\.(\d+)\.", n).group(1)) for n in adapted}
        assert len(experts) == NUM_EXPERTS // ep and all(re.fullmatch(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj", n) for n in adapted)
    # written back in the fused format it came in (test_hf_made_adapter_is_written_back_bit_for_bit)


# ---- adapters HF peft made on the family (attention modules + transformers 5's fused experts) -------------
@cases("hf-logits", where=lambda case: case.adapter == "hf")
def test_hf_made_adapter_gives_hf_peft_logits(case, moe_launch, moe_root):
    """peft on the HF model adapts the family's attention projections (MLA: q_a_proj, q_b_proj,
    kv_a_proj_with_mqa, kv_b_proj, o_proj; phimoe's biased o_proj) and, through target_parameters (peft's rewrite
    of the expert names, or named so where peft has none: granitemoe, phimoe), the fused routed experts: the
    megatron model gives HF peft's logits with every one of them adapted, on both ranks. granitemoe's experts are
    stacked on disk too: each expert's slot is its whole gate_up / down slice."""
    folder = adapter_path(moe_root, case.checkpoint, "hf")
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    targets = HF_ADAPTER_TARGETS[case.checkpoint]
    experts = EXPERT_PROJECTIONS.get(case.checkpoint, {"gate_proj", "up_proj", "down_proj"})
    attention = [name for name in targets if name not in experts]
    fused = attention != targets or case.checkpoint in HF_ADAPTER_PARAMETERS
    assert sorted(config["target_modules"]) == sorted(attention)
    parameters = sorted(name.rsplit(".", 1)[-1] for name in config["target_parameters"] or [])
    assert parameters == (["down_proj", "gate_up_proj"] if fused else [])
    expected = peft_logits(moe_root, case.checkpoint, folder)
    assert (expected - base_logits(moe_root, case.checkpoint)).abs().max() > 0.02  # granitemoe's logits are ÷8
    for rank in range(RANKS):
        result = record(moe_launch, case, rank)
        assert_logits_close(result["tensors"]["logits"], expected, f"{case.id} rank {rank}")
        adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in result["info"]["adapted"]}
        assert adapted == set(attention) | (experts if fused else set()), f"rank {rank}: {sorted(adapted)}"


@cases("hf-logits", where=lambda case: case.adapter in ("hf", "fused"))
def test_hf_made_adapter_is_written_back_bit_for_bit(case, moe_launch, moe_root):
    """save_adapter writes an adapter read from target_parameters back in that format: HF's keys (the fused
    `experts.[base_layer.]lora_A/B.weight`), the same bytes, the same target_parameters and patterns."""
    source = adapter_path(moe_root, case.checkpoint, case.adapter)
    written = os.path.join(record(moe_launch, case)["folder"], "adapter")
    before, after = read_safetensors(source), read_safetensors(written)
    assert sorted(after) == sorted(before)
    changed = [key for key in before if before[key].dtype != after[key].dtype or not torch.equal(before[key], after[key])]
    assert not changed, f"{len(changed)} tensors differ: {changed[:3]}"
    configs = []
    for folder in (source, written):
        with open(os.path.join(folder, "adapter_config.json")) as f:
            configs.append(json.load(f))
    for key in ("target_parameters", "target_modules"):
        assert sorted(configs[1][key] or []) == sorted(configs[0][key] or []), key
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        assert configs[1][key] == configs[0][key], key


@cases("hf-logits", where=lambda case: case.adapter == "hf" and LAYOUTS[case.layout]["tp"] == 1
       and case.checkpoint in HF_ADAPTER_PARAMETERS and case.checkpoint not in EVAL_ONLY)
def test_stacked_expert_gradients_equal_hf_peft(case, moe_launch, moe_root):
    """granitemoe (each expert's slot is its whole stacked slice, so its A and B are peft's expert e block): one
    backward, the loss and d loss / d A, B of every adapter against HF peft's own backward, whose fused expert
    A [E·r, in] and B [out, r·E] hold expert e's rows e·r … e·r + r and columns e, e + E, ... (as at ep = 2 in
    test_per_expert_gradients_equal_the_merged_reference, a routed expert sees both ranks' tokens: 2 × HF's)."""
    from peft import PeftModel

    folder = adapter_path(moe_root, case.checkpoint, "hf")
    model = PeftModel.from_pretrained(hf_base(moe_root, case.checkpoint), folder, is_trainable=True).train()
    loss = model(**make_inputs(model.config.vocab_size)).loss
    loss.backward()
    expected = {}
    for name, module in model.named_modules():
        parameter = getattr(module, "parameter_name", None)  # peft's ParamWrapper on a stacked expert tensor
        if parameter is None:
            continue
        path = re.sub(r"(\.base_layer)+$", "", name).removeprefix("base_model.model.")
        grad_a, grad_b = module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad
        experts = getattr(module.get_base_layer(), parameter).shape[0]
        r = grad_a.shape[0] // experts
        for e in range(experts):
            for kind, grad in (("lora_A", grad_a[e * r : (e + 1) * r]), ("lora_B", grad_b[:, e::experts])):
                expected[f"base_model.model.{path}.{e}.{parameter}.{kind}.weight"] = grad
    for name, param in model.named_parameters():
        if param.requires_grad and ".experts." not in name:
            expected[name.replace(".default.", ".")] = param.grad
    ep = LAYOUTS[case.layout]["ep"]
    for rank in range(RANKS):
        result = record(moe_launch, case, rank)
        assert abs(result["tensors"]["loss"].item() - loss.item()) < 1e-5, f"rank {rank}: loss"
        grads = result["tensors"]["grads"]
        assert grads and set(grads) <= set(expected)
        if ep == 1:
            assert set(grads) == set(expected), f"rank {rank}: ep=1 holds every adapter"
        for name, grad in grads.items():
            factor = ep if ".experts." in name else 1
            scale = expected[name].abs().max().item() * factor
            diff = (grad - factor * expected[name]).abs().max().item()
            assert diff <= GRAD_TOL * max(scale, 1e-6), f"rank {rank} {name}: |grad - HF peft| = {diff:.3g} (max {scale:.3g})"


# ---- refused ------------------------------------------------------------------------------------
@cases("error", where=lambda case: case.kind == "error-no-per-expert-names")
def test_experts_without_per_expert_names_are_refused(case, moe_launch):
    """gpt_oss keeps its experts fused on disk too: no per-expert HF names, so no expert LoRA; nothing is saved."""
    for rank in range(RANKS):
        result = record(moe_launch, case, rank)
        assert not result["ok"] and result["error_type"] == "AdapterError", result.get("error")
        for word in ("gate_proj", "per-expert", "linear_fc1"):
            assert word in result["error"], f"{word!r} not in: {result['error']}"
    assert record(moe_launch, case)["info"]["files_after"] == []


@cases("error", where=lambda case: case.kind == "error-experts-as-modules")
def test_stacked_experts_named_as_modules_are_refused_with_the_fix(case, moe_launch):
    """granitemoe's experts are parameters in transformers: peft adapts them only through target_parameters (in
    target_modules HF peft silently adapts nothing for them). Naming them is refused with that fix, and
    "all-linear" adapts attention only, as on the HF model."""
    for rank in range(RANKS):
        result = record(moe_launch, case, rank)
        assert result["info"]["all_linear"] == sorted(ATTENTION), result["info"]["all_linear"]
        assert not result["ok"] and result["error_type"] == "AdapterError", result.get("error")
        for word in ("down_proj", "target_parameters=['gate_up_proj', 'down_proj']"):
            assert word in result["error"], f"{word!r} not in: {result['error']}"


@cases("error", where=lambda case: case.kind == "error-target-parameters")
def test_target_parameters_other_than_stacked_experts_are_refused_before_anything_is_made(case, moe_launch):
    for rank in range(RANKS):
        result = record(moe_launch, case, rank)
        assert not result["ok"], f"rank {rank}: {case.kind} did not raise"
        assert result["error_type"] == "AdapterError" and "MCoreTransformersError" in result["error_mro"]
        for word in ("target_parameters", "self_attn.q_proj.weight", "stacked expert tensor"):
            assert word in result["error"], f"{word!r} not in: {result['error']}"
        assert result["info"]["lora_layers"] == []


def test_the_oracle_merges_per_expert(moe_root):
    """The reference itself: merging an adapter changes exactly the expert slices it names."""
    hf = hf_base(moe_root, "qwen3_moe")
    before = hf.model.layers[2].mlp.experts.gate_up_proj.detach().clone()
    delta = torch.ones(32, 64)
    merge_into_hf(hf, {"model.layers.2.mlp.experts.3.up_proj": delta})
    after = hf.model.layers[2].mlp.experts.gate_up_proj.detach()
    assert torch.equal(after[3, 32:], before[3, 32:] + 1) and torch.equal(after[3, :32], before[3, :32])
    assert torch.equal(after[:3], before[:3])
