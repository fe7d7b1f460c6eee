"""LoRA through stock peft on megatron-core models, against transformers + peft (the oracle).

One worker launch per layout (tp1: plain python; tp2, pp2: torchrun with 2 ranks) runs every case of
that layout (tests/dist_lora_worker.py) and records logits, gradients, saved folders and errors;
these tests compare them with HF peft on the same checkpoints, adapters and inputs.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_lora_worker import (  # noqa: E402
    ADAPTERS, CASES, LAYOUTS, adapter_path, case_record, hf_logits, make_inputs, parametrize_cases, prepare,
    read_safetensors,
)
import launching  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_lora_worker.py")
LAUNCH_TIMEOUT_S = 300
# fp32: the bound. bf16: megatron and HF round differently inside every layer (the parity
# suite measures |mcore bf16 - HF bf16| under ~1.5e-2 on these models without adapters).
LOGITS_TOL = {"float32": 1e-4, "bfloat16": 5e-2}
GRAD_TOL = 1e-4  # relative to the largest gradient of the tensor


cases = functools.partial(parametrize_cases, CASES)


# ---- launching ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def lora_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("lora-inputs"))
    prepare(root)
    return root


@pytest.fixture(scope="session")
def lora_launch(lora_root, tmp_path_factory):
    """`lora_launch(layout)` runs the worker for that layout once per session; returns its output folder
    (`lora_launch.log(layout)`: the launch's log)."""
    get = launching.once_per_key(WORKER, lora_root, tmp_path_factory, "lora", lambda layout: LAYOUTS[layout]["world"],
                                 LAUNCH_TIMEOUT_S)

    def launch(layout: str) -> str:
        return get(layout)[0]

    launch.log = lambda layout: get(layout)[1]
    return launch


def record(lora_launch, case, rank: int = 0) -> dict:
    out = lora_launch(case.layout)
    return case_record(out, case, rank, lora_launch.log(case.layout))


# ---- the oracle ---------------------------------------------------------------------------------
def hf_base(lora_root, checkpoint: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.join(lora_root, checkpoint), dtype=getattr(torch, dtype)).eval()


def hf_peft(lora_root, checkpoint: str, adapter_folder: str, dtype: str = "float32", **kwargs):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_base(lora_root, checkpoint, dtype), adapter_folder, **kwargs)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    valid = make_inputs(expected.shape[-1])["attention_mask"].bool()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    tol = LOGITS_TOL[str(expected.dtype).removeprefix("torch.")]
    diff = (actual.float() - expected.float())[valid].abs().max().item()
    assert diff <= tol, f"{what}: max |logits - HF peft| = {diff:.3g} > {tol:g}"


# ---- HF adapter -> megatron ---------------------------------------------------------------------
@cases("hf-logits")
def test_hf_adapter_gives_hf_peft_logits(case, lora_launch, lora_root):
    peft_model = hf_peft(lora_root, case.checkpoint, adapter_path(lora_root, case.checkpoint, case.adapter), case.dtype)
    expected = hf_logits(peft_model, peft_model.config.vocab_size)
    base = hf_logits(hf_base(lora_root, case.checkpoint, case.dtype), peft_model.config.vocab_size)
    assert (expected - base).abs().max() > 0.05, "the adapter must change the logits for this test to mean anything"
    for rank in range(case.ranks):
        assert_logits_close(record(lora_launch, case, rank)["tensors"]["logits"], expected, f"{case.id} rank {rank}")


# ---- megatron-made adapter -> HF PEFT folder ----------------------------------------------------
@cases("export")
def test_exported_adapter_loads_in_hf_peft(case, lora_launch, lora_root):
    result = record(lora_launch, case)
    folder = os.path.join(result["folder"], "adapter")
    peft_model = hf_peft(lora_root, case.checkpoint, folder)
    assert_logits_close(result["tensors"]["logits"], hf_logits(peft_model, peft_model.config.vocab_size), case.id)


@cases("export")
def test_exported_adapter_follows_hf_and_vllm_format(case, lora_launch, lora_root):
    result = record(lora_launch, case)
    folder = os.path.join(result["folder"], "adapter")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == sorted(ADAPTERS[case.adapter]["target_modules"])
    assert config["base_model_name_or_path"] == os.path.join(lora_root, case.checkpoint)
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    # vLLM's rules: no modules_to_save, no DoRA, bias "none".
    assert not config.get("modules_to_save") and not config.get("use_dora") and config["bias"] == "none"

    hf = hf_base(lora_root, case.checkpoint)
    tensors = read_safetensors(folder)
    expected, targets = {}, ADAPTERS[case.adapter]["target_modules"]
    for name, module in hf.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            expected[f"base_model.model.{name}.lora_A.weight"] = (4, module.in_features)
            expected[f"base_model.model.{name}.lora_B.weight"] = (module.out_features, 4)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected


# Under pp each stage's PeftModel.save_pretrained sees only its own layers: save_adapter is the way there.
@cases("export", where=lambda case: LAYOUTS[case.layout]["pp"] == 1)
def test_stock_save_pretrained_matches_save_adapter_when_pp_is_1(case, lora_launch):
    result = record(lora_launch, case)
    ours = read_safetensors(os.path.join(result["folder"], "adapter"))
    stock = read_safetensors(os.path.join(result["folder"], "stock"))
    assert ours.keys() == stock.keys()
    assert all(torch.equal(ours[k], stock[k]) for k in ours)


# ---- merge ----------------------------------------------------------------------------------------
@cases("merge")
def test_merged_model_equals_hf_peft_merge(case, lora_launch, lora_root, tmp_path):
    result = record(lora_launch, case)
    assert result["info"]["merged_type"] == "MCoreModelForCausalLM" and result["info"]["lora_modules_left"] == []
    adapter = adapter_path(lora_root, case.checkpoint, case.adapter)
    merged_hf = hf_peft(lora_root, case.checkpoint, adapter, case.dtype).merge_and_unload()
    merged_hf.save_pretrained(str(tmp_path))  # what transformers writes (a tied head left out, as ours leaves it)
    expected = read_safetensors(str(tmp_path))
    saved = read_safetensors(os.path.join(result["folder"], "merged"))
    assert sorted(saved) == sorted(expected)
    for name, tensor in saved.items():
        assert tensor.dtype == expected[name].dtype, f"{name}: dtype"
        diff = (tensor.float() - expected[name].float()).abs().max().item()
        assert diff == 0.0, f"{name}: merged weight differs from HF peft's merge by {diff:.3g}"


@cases("merge")
def test_merged_logits_equal_adapter_logits(case, lora_launch, lora_root):
    result = record(lora_launch, case)
    peft_model = hf_peft(lora_root, case.checkpoint, adapter_path(lora_root, case.checkpoint, case.adapter), case.dtype)
    expected = hf_logits(peft_model, peft_model.config.vocab_size)
    assert_logits_close(result["tensors"]["adapter_logits"], expected, f"{case.id} before merge")
    assert_logits_close(result["tensors"]["merged_logits"], expected, f"{case.id} after merge")


# ---- training -----------------------------------------------------------------------------------
@cases("grads")
def test_gradients_equal_hf_peft(case, lora_launch, lora_root):
    peft_model = hf_peft(lora_root, case.checkpoint, adapter_path(lora_root, case.checkpoint, case.adapter), is_trainable=True)
    peft_model.train()
    for module in peft_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the worker compares without dropout too (and checks dropout separately)
    batch = make_inputs(peft_model.config.vocab_size)
    loss = peft_model(**batch).loss
    loss.backward()
    expected = {n.replace(".default.", "."): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    records = [record(lora_launch, case, rank) for rank in range(case.ranks)]
    for rank, result in enumerate(records):
        assert abs(result["tensors"]["loss"].item() - loss.item()) < 1e-5, f"rank {rank}: loss"
        grads = result["tensors"]["grads"]
        assert grads.keys() == expected.keys(), f"rank {rank}: trainable parameters differ from HF peft's"
        for name, grad in expected.items():
            scale = grad.abs().max().item()
            diff = (grads[name] - grad).abs().max().item()
            assert diff <= GRAD_TOL * max(scale, 1e-6), f"rank {rank} {name}: |grad - HF| = {diff:.3g} (max |grad| {scale:.3g})"
    for rank, result in enumerate(records[1:], 1):  # tensor-parallel replicas get the same (summed) gradient
        assert all(torch.equal(result["tensors"]["grads"][n], records[0]["tensors"]["grads"][n]) for n in expected)


@cases("grads", where=lambda case: ADAPTERS[case.adapter].get("lora_dropout", 0) > 0)
def test_dropout_trains_and_keeps_tensor_parallel_replicas_equal(case, lora_launch):
    records = [record(lora_launch, case, rank)["tensors"] for rank in range(case.ranks)]
    first = records[0]
    assert first["dropout_loss"].item() != first["loss"].item(), "dropout had no effect in training mode"
    for other in records[1:]:
        assert other["dropout_loss"].item() == first["dropout_loss"].item()
        assert all(torch.equal(other["dropout_grads"][n], first["dropout_grads"][n]) for n in first["dropout_grads"])


@cases("grads")
def test_only_adapter_weights_are_trainable(case, lora_launch):
    info = record(lora_launch, case)["info"]
    assert info["base_requires_grad"] == []
    assert info["requires_grad"] and all(".lora_A." in n or ".lora_B." in n for n in info["requires_grad"])


# ---- adapters as peft manages them --------------------------------------------------------------
@pytest.mark.compat  # LoRA generate, adapter switching: in the compatibility subset
@cases("multi")
def test_named_adapters_switch_disable_and_unload(case, lora_launch, lora_root):
    tensors = record(lora_launch, case)["tensors"]
    first = hf_peft(lora_root, case.checkpoint, adapter_path(lora_root, case.checkpoint, "all"))
    vocab = first.config.vocab_size
    second = hf_peft(lora_root, case.checkpoint, adapter_path(lora_root, case.checkpoint, "q"))
    base = hf_logits(hf_base(lora_root, case.checkpoint), vocab)
    assert_logits_close(tensors["first"], hf_logits(first, vocab), "adapter 'first'")
    prompt = make_inputs(vocab)["input_ids"][:1, :6]
    assert torch.equal(tensors["generated"], first.generate(input_ids=prompt, max_new_tokens=5, do_sample=False))
    assert_logits_close(tensors["second"], hf_logits(second, vocab), "set_adapter('second')")
    assert_logits_close(tensors["disabled"], base, "disable_adapter()")
    assert torch.equal(tensors["first_again"], tensors["first"])
    assert_logits_close(tensors["unloaded"], base, "unload()")
    assert_logits_close(tensors["view_removed"], base, "mcore_transformers.peft.disable()")


@cases("names")
def test_megatron_names_map_to_hf_projections(case, lora_launch):
    info = record(lora_launch, case)["info"]
    assert info["mapped"] == ["q_proj", "k_proj", "v_proj", "down_proj", "o_proj"]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in info["adapted"]}
    assert adapted == {"q_proj", "k_proj", "v_proj", "down_proj", "o_proj"}
    # Stock peft matches names literally and megatron's own modules are never targets: megatron names are refused
    # with the way to use them (hf_target_modules).
    message = info["stock_mcore_name"]["message"]
    assert "megatron-core's linear names" in message and "hf_target_modules" in message, message


# ---- bad input ----------------------------------------------------------------------------------
ERRORS = {
    "error-dora": ("AdapterError", ("DoRA", "vLLM")),
    "error-no-match": ("NoMatchingPeftModuleError", ("qq_proj",)),
    "error-partial-match": ("AdapterError", ("lm_head", "q_proj")),
    "error-other-base": ("AdapterError", ("[4, 96]", "[4, 64]", "different base model")),
    "error-bias-all": ("AdapterError", ("bias='all'",)),
    "error-modules-to-save": ("AdapterError", ("modules_to_save", "lm_head")),
    "error-pissa": ("AdapterError", ("pissa",)),
    "error-mixed-batch": ("AdapterError", ("adapter_names", "set_adapter")),
    "error-save-target": ("AdapterError", ("notes.txt", "not an adapter")),
}


@cases("error")
def test_bad_input_raises_a_clear_error(case, lora_launch):
    expected_type, words = ERRORS[case.kind]
    for rank in range(case.ranks):
        result = record(lora_launch, case, rank)
        assert not result["ok"], f"rank {rank}: {case.kind} did not raise"
        assert result["error_type"] == expected_type, f"rank {rank}: {result['error_type']}: {result['error']}"
        if expected_type == "AdapterError":
            assert "MCoreTransformersError" in result["error_mro"]
        for word in words:
            assert word.lower() in result["error"].lower(), f"{word!r} not in: {result['error']}"
    if case.kind == "error-no-match":  # peft raises before any of our code runs; our helper names the choices
        helper = record(lora_launch, case)["info"]["helper"]
        assert helper["type"] == "AdapterError" and "q_proj" in helper["message"] and "linear_qkv" in helper["message"]
    if case.kind == "error-save-target":
        assert record(lora_launch, case)["info"]["files_after"] == ["notes.txt"]


def test_case_tables_cover_every_layout():
    assert {case.layout for case in CASES} == set(LAYOUTS)
    assert {case.adapter for case in CASES} == set(ADAPTERS)  # no adapter left without a case
