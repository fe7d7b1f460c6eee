"""`mcore_transformers.tools.verify`, the `mcore-transformers` command (verify, convert) and the demo, end to end.

verify and convert run in this process (a world of one); the demo runs as users run it: one command
that starts its own two processes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

import mcore_transformers
import torch

from mcore_transformers import MCoreModelForCausalLM
from mcore_transformers.tools.cli import main
from mcore_transformers.errors import MCoreTransformersError
from mcore_transformers.tools.tiny import make_tiny_checkpoint
from mcore_transformers.tools.verify import VerificationError, VerifyReport, make_inputs, verify

DEMO_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("cli") / "llama"), "llama")


def safetensors_of(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


# ---- verify --------------------------------------------------------------------------------------
def test_verify_passes_and_reports_every_number(tiny_llama):
    report = verify(tiny_llama, batch_size=2, seq_len=16)
    assert isinstance(report, VerifyReport) and report.passed
    assert report.max_abs_logit_diff <= 1e-4 and report.loss_diff <= 1e-5 and report.argmax_agreement == 1.0
    assert report.num_tokens == int(make_inputs(2, 16, 250, 0, 0)[1].sum())  # padding excluded
    assert report.num_parameters == sum(t.numel() for t in safetensors_of(tiny_llama).values())
    text = str(report)
    for needle in ("max |Δ logit|", "argmax agreement", "|Δ loss|", "tp=1 pp=1", "float32", "PASS"):
        assert needle in text


def test_verify_inputs_are_left_padded_with_ignored_labels():
    input_ids, attention_mask, position_ids, labels = make_inputs(3, 12, 100, pad_token_id=7, seed=0)
    assert attention_mask[0].all() and not attention_mask[2, 0]  # row 0 full, later rows padded on the left
    assert (labels[attention_mask == 0] == -100).all() and (input_ids[attention_mask == 0] == 7).all()
    assert position_ids[2, attention_mask[2].argmax()] == 0  # positions count from the first real token
    assert torch.equal(make_inputs(3, 12, 100, 7, 0)[0], input_ids)  # deterministic


def _perturb_norm(model):
    """A 1% error in one norm weight: what a wrong rule or a stale shard looks like."""
    name, param = next((n, p) for n, p in model.named_parameters() if "layers.1." in n and "norm" in n)
    with torch.no_grad():
        param.mul_(1.01)
    return name


def _drop_rope_scaling(model):
    """Plain rope instead of llama3 scaling: what a config option lost in translation looks like."""
    dim = model.rotary_inv_freq.numel() * 2
    theta = model.config.rope_parameters["rope_theta"]
    plain = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    assert not torch.allclose(plain, model.rotary_inv_freq.float().cpu())  # the checkpoint really scales
    model.rotary_inv_freq.copy_(plain.to(model.rotary_inv_freq))
    return "rotary_inv_freq"


@pytest.mark.parametrize("corrupt", [_perturb_norm, _drop_rope_scaling], ids=["norm-weight-1%", "rope-scaling-lost"])
def test_verify_fails_loudly_on_a_real_mismatch(tiny_llama, corrupt):
    model = MCoreModelForCausalLM.from_pretrained(tiny_llama)
    corrupt(model)
    with pytest.raises(VerificationError) as caught:
        verify(tiny_llama, model=model)
    report = caught.value.report
    assert not report.passed and "max |Δ logit|" in report.failures
    assert report.max_abs_logit_diff > 10 * report.logits_tolerance  # far past it, not at the edge
    assert isinstance(caught.value, MCoreTransformersError) and "FAIL" in str(caught.value)


def test_verify_refuses_an_unknown_dtype(tiny_llama):
    with pytest.raises(ValueError, match="float64"):
        verify(tiny_llama, dtype=torch.float64)


# ---- the command ---------------------------------------------------------------------------------
def test_cli_verify_exits_0_within_tolerance(tiny_llama, capsys):
    assert main(["verify", tiny_llama, "--seq-len", "16"]) == 0
    assert "result  PASS" in capsys.readouterr().out


def test_cli_verify_exits_1_and_prints_the_table_on_mismatch(tiny_llama, capsys, monkeypatch):
    load = MCoreModelForCausalLM.from_pretrained.__func__

    def corrupted(cls, *args, **kwargs):
        model = load(cls, *args, **kwargs)
        _perturb_norm(model)
        return model

    monkeypatch.setattr(MCoreModelForCausalLM, "from_pretrained", classmethod(corrupted))
    assert main(["verify", tiny_llama, "--seq-len", "16"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "max |Δ logit|" in captured.out and "disagree" in captured.err


def test_cli_convert_round_trip_is_bit_exact(tiny_llama, tmp_path, capsys):
    target = str(tmp_path / "converted")
    assert main(["convert", tiny_llama, target, "--to", "hf", "--max-shard-size", "100KB"]) == 0
    assert "bit-exact" in capsys.readouterr().out
    assert os.path.exists(os.path.join(target, "model.safetensors.index.json"))  # re-sharded as asked
    source, converted = safetensors_of(tiny_llama), safetensors_of(target)
    assert source.keys() == converted.keys()
    assert all(source[k].dtype == converted[k].dtype and torch.equal(source[k], converted[k]) for k in source)
    with open(os.path.join(tiny_llama, "config.json")) as a, open(os.path.join(target, "config.json")) as b:
        assert a.read() == b.read()  # config copied verbatim


def test_cli_convert_casts_and_records_the_dtype(tiny_llama, tmp_path, capsys):
    from transformers import AutoConfig

    target = str(tmp_path / "bf16")
    assert main(["convert", tiny_llama, target, "--to", "hf", "--dtype", "bfloat16"]) == 0
    assert "after the cast to bfloat16" in capsys.readouterr().out
    source, converted = safetensors_of(tiny_llama), safetensors_of(target)
    assert all(torch.equal(source[k].to(torch.bfloat16), converted[k]) for k in source)
    assert AutoConfig.from_pretrained(target).dtype == torch.bfloat16


def test_cli_convert_refuses_to_overwrite_its_source(tiny_llama, capsys):
    assert main(["convert", tiny_llama, tiny_llama]) == 1
    assert "same folder" in capsys.readouterr().err


# ---- the demo ------------------------------------------------------------------------------------
def _command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "mcore-transformers")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "mcore_transformers.tools.cli"]


@pytest.mark.compat  # the newcomer's first command
def test_demo_runs_on_two_processes_and_its_folder_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    output = str(tmp_path / "demo-output")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run(
        [*_command(), "demo", "--output", output], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=DEMO_TIMEOUT_S,
    )
    log = proc.stdout
    assert proc.returncode == 0, log
    for needle in (
        "over 2 local processes", "2 processes up", "from_pretrained(model, tp=2)", "result  PASS",
        "the same tokens as",
        "bit-identical to the original checkpoint", "identical to the original model's", "PASS in",
    ):
        assert needle in log, f"{needle!r} missing from the demo's output:\n{log}"
    assert "Loading weights" not in log and "Traceback" not in log  # a clean narrative
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    shipped = os.path.join(os.path.dirname(mcore_transformers.__file__), "assets", "demo-model", "config.json")
    expected_hidden = json.load(open(shipped))["hidden_size"] if os.path.exists(shipped) else 256
    assert reloaded.config.model_type == "llama" and reloaded.config.hidden_size == expected_hidden
    assert not glob.glob(os.path.join(str(tmp_path), ".*tmp*"))  # no half-written folders left behind
    shutil.rmtree(output)
