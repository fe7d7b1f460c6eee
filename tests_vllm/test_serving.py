"""Folders written by mcore_transformers, served by a real vLLM engine: greedy tokens equal transformers' on the
same folder (float32), in every layout they were saved from; with dtype="auto" vLLM serves the dtype the files hold
(it downcasts float32 configs to bfloat16 on its own, so the check is a float16 save of bfloat16 files); a config
without `architectures` gets the causal-LM class; adapters load with enable_lora + LoRARequest and equal
transformers' PeftModel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import folders  # noqa: E402
import serve_worker  # noqa: E402
from conftest import worker_env  # noqa: E402

pytestmark = pytest.mark.vllm
AUTO_DTYPE = {"demo-fp16": "float16"}  # served with dtype="auto": what vLLM must pick


@pytest.fixture(scope="module")
def served(saved, tmp_path_factory) -> dict:
    """Every folder served once (one process, engines one after another)."""
    work = tmp_path_factory.mktemp("vllm-serving")
    jobs = [{"name": name, "folder": saved[name], "dtype": "auto" if name in AUTO_DTYPE else "float32",
             "lora": saved["adapter"] if name == "llama-tp1" else None} for name in folders.SAVED]
    (work / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "serve_worker.py"), str(work / "jobs.json"),
                           str(work / "out.json")], env=worker_env(), capture_output=True, text=True, timeout=1200)
    if not (work / "out.json").exists():
        pytest.fail(f"the vLLM worker wrote nothing (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads((work / "out.json").read_text())


def _transformers_tokens(folder: str, adapter: str = None, dtype: torch.dtype = torch.float32) -> list:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    tokens = []
    for ids in serve_worker.PROMPTS:
        out = model.generate(torch.tensor([ids]), max_new_tokens=serve_worker.NEW_TOKENS,
                             min_new_tokens=serve_worker.NEW_TOKENS, do_sample=False, pad_token_id=0)
        tokens.append(out[0, len(ids):].tolist())
    return tokens


def _record(served, name):
    record = served.get(name)
    assert record is not None, f"{name} was not served"
    if "error" in record:
        pytest.fail(f"vLLM failed on {name}: {record['error']}\n{record['traceback']}")
    return record


@pytest.mark.parametrize("name", list(folders.SAVED))
def test_vllm_serves_saved_folders_like_transformers(served, saved, name):
    record = _record(served, name)
    dtype = AUTO_DTYPE.get(name, "float32")
    assert record["dtype"] == dtype  # dtype="auto": the dtype config.json states, which the files hold
    assert record["tokens"] == _transformers_tokens(saved[name], dtype=getattr(torch, dtype))


def test_saved_dtype_is_stated_and_architectures_added(served, saved):
    config = json.load(open(os.path.join(saved["demo-fp32"], "config.json")))
    source = json.load(open(os.path.join(folders.DEMO, "config.json")))
    assert source["dtype"] == "bfloat16" and config["dtype"] == "float32"
    assert {k for k in source if source[k] != config.get(k)} == {"dtype"}  # every other key as the source had it
    assert json.load(open(os.path.join(saved["demo-fp16"], "config.json")))["dtype"] == "float16"
    assert json.load(open(os.path.join(saved["no-architectures"], "config.json")))["architectures"] == ["LlamaForCausalLM"]
    assert _record(served, "no-architectures")["architecture"] == "LlamaForCausalLM"


def test_vllm_serves_exported_adapters_like_peft(served, saved):
    record = _record(served, "llama-tp1")
    assert record["lora_tokens"] == _transformers_tokens(saved["llama-tp1"], saved["adapter"])
    assert record["lora_tokens"] != record["tokens"]  # the adapter changes what is generated
