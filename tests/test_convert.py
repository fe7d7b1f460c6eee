"""`mcore-transformers convert`: HF folders ⇄ megatron-core distributed checkpoints, resharded, bit-exact.

One launch of tests/dist_convert_worker.py (2 processes under torchrun) runs the command's steps; these
tests read what it wrote:

- HF -> distributed checkpoint -> HF at another layout gives back every source tensor bit for bit (dense at
  tp=2 -> pp=2 and tp=1; tied embeddings with a padded vocabulary, cast to bf16; stacked experts over ep=2
  -> tp=2, still stacked; DeepSeek-V3's unclaimed MTP tensors; one KV head repeated at tp=2);
- a checkpoint resharded into another checkpoint (tp=2 -> pp=2) and the folders `from_pretrained` loads
  directly pass the HF-vs-mcore precision check (`--verify`);
- an HF PEFT adapter merged on the way equals peft's merge_and_unload on the transformers model;
- an HF PEFT adapter kept as adapter state in a checkpoint (tp=2), resharded into another (pp=2), comes back
  as an HF PEFT folder bit for bit, and merged out of the checkpoint equals merge_and_unload;
- what cannot work is refused with the cause and the fix: another query-group count, an interrupted
  checkpoint, a non-empty target (left untouched), resuming training from a weights-only checkpoint, an
  adapter of another base, --merge-lora without an adapter, a folder that is not a LoRA adapter.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_moe_worker as M  # noqa: E402
import launching  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_convert_worker.py")
LAUNCH_TIMEOUT_S = 600


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[str, str, dict]:
    """(ROOT with the sources, OUT with what the worker wrote, its record)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    root = str(tmp_path_factory.mktemp("convert-sources"))
    M.build_checkpoints(root, names={"qwen3_moe-stacked", "deepseek_v3-mtp"})
    make_tiny_checkpoint(os.path.join(root, "llama"), "llama")
    make_tiny_checkpoint(os.path.join(root, "llama-kv1"), "llama", num_key_value_heads=1)
    make_tiny_checkpoint(os.path.join(root, "qwen2-tied-v251"), "qwen2", vocab_size=251, tie_word_embeddings=True)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(root, "llama"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(os.path.join(root, "adapter"))

    out = str(tmp_path_factory.mktemp("convert"))
    _, log = launching.launch(WORKER, [root, out], 2, LAUNCH_TIMEOUT_S, os.path.join(out, "worker.log"))
    path = os.path.join(out, "record.json")
    assert os.path.exists(path), f"the worker wrote no record:\n{log[-6000:]}"
    with open(path) as f:
        return root, out, json.load(f)


def _step(converted, step: str) -> dict:
    _, _, record = converted
    assert record["steps"][step] == 0, f"{step} exited {record['steps'][step]}:\n{record['output'][step]}"
    return record["output"][step]


@pytest.mark.parametrize("source,steps,result", [
    ("llama", ["llama-to-mcore-tp2", "llama-to-hf-pp2"], "llama-hf-pp2"),
    ("llama", ["llama-to-mcore-tp2", "llama-to-hf-tp1"], "llama-hf-tp1"),
    ("llama", ["llama-mcore-to-mcore-pp2", "llama-pp2-to-hf"], "llama-hf-from-pp2"),
    ("qwen3_moe-stacked", ["moe-to-mcore-ep2", "moe-to-hf-tp2"], "moe-hf"),
    ("deepseek_v3-mtp", ["mtp-to-mcore-tp2", "mtp-to-hf"], "mtp-hf"),
    ("llama-kv1", ["kv1-to-mcore-tp2", "kv1-to-hf-tp2"], "kv1-hf"),
])
def test_round_trip_through_a_distributed_checkpoint_is_bit_exact(converted, source, steps, result):
    root, out, _ = converted
    for step in steps:
        _step(converted, step)
    expected, got = _tensors(os.path.join(root, source)), _tensors(os.path.join(out, result))
    assert sorted(got) == sorted(expected)  # the source's names: stacked experts stay stacked, MTP tensors kept
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    with open(os.path.join(root, source, "config.json")) as a, open(os.path.join(out, result, "config.json")) as b:
        before, after = json.load(a), json.load(b)
    if "architectures" not in before:  # named on save, so vLLM picks the causal LM (stacked sources lack it)
        assert after.pop("architectures")[0].endswith("ForCausalLM")
    assert after == before


def test_cast_on_the_way_in_is_recorded_and_exact(converted):
    from transformers import AutoConfig

    root, out, _ = converted
    _step(converted, "tied-to-mcore-bf16")
    _step(converted, "tied-to-hf-pp2")
    with open(os.path.join(out, "tied-bf16", "mcore_state", "layout.json")) as f:
        layout = json.load(f)
    assert (layout["tp"], layout["dtype"], layout["optimizer"]) == (2, "bfloat16", None)
    assert AutoConfig.from_pretrained(os.path.join(out, "tied-bf16")).dtype == torch.bfloat16
    expected, got = _tensors(os.path.join(root, "qwen2-tied-v251")), _tensors(os.path.join(out, "tied-hf"))
    assert sorted(got) == sorted(expected) and got["model.embed_tokens.weight"].shape[0] == 251
    assert all(torch.equal(got[name], tensor.to(torch.bfloat16)) for name, tensor in expected.items())


def test_the_checkpoint_holds_only_megatron_shards_and_the_non_weight_files(converted):
    _, out, _ = converted
    printed = _step(converted, "llama-to-mcore-tp2")
    folder = os.path.join(out, "llama-tp2")
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "mcore_state"]
    assert sorted(os.listdir(os.path.join(folder, "mcore_state"))) == ["dist_ckpt", "hf_tensors.json", "layout.json"]
    files = os.listdir(os.path.join(folder, "mcore_state", "dist_ckpt"))
    assert "metadata.json" in files and sum(f.endswith(".distcp") for f in files) >= 2  # each rank wrote its own
    assert "every shard bit-exact" in printed and "result  PASS" in printed
    assert not [e for e in os.listdir(out) if ".tmp-" in e]  # written beside, renamed into place


@pytest.mark.parametrize("step", ["llama-to-mcore-tp2", "llama-pp2-to-hf", "moe-to-mcore-ep2"])
def test_converted_folders_pass_the_precision_check(converted, step):
    printed = _step(converted, step)
    assert "result  PASS" in printed and "max |Δ logit|" in printed


def test_merged_adapter_equals_peft_merge_and_unload(converted):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, out, _ = converted
    _step(converted, "merge-lora-tp2")
    base = AutoModelForCausalLM.from_pretrained(os.path.join(root, "llama"))
    merged = PeftModel.from_pretrained(base, os.path.join(root, "adapter")).merge_and_unload()
    expected, got = merged.state_dict(), _tensors(os.path.join(out, "merged"))
    source = _tensors(os.path.join(root, "llama"))
    assert sorted(got) == sorted(source)
    changed = [n for n in got if not torch.equal(got[n], source[n])]
    assert changed and all(("q_proj" in n or "v_proj" in n or "down_proj" in n) for n in changed)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("steps,adapter,base", [
    (["adapter-to-mcore-tp2", "adapter-tp2-to-hf"], "lora-hf/adapter", "lora-hf"),
    (["adapter-to-mcore-tp2", "adapter-tp2-to-mcore-pp2", "adapter-pp2-to-hf"], "lora-adapter-from-pp2",
     "lora-hf-from-pp2"),
])
def test_adapter_state_round_trip_through_distributed_checkpoints_is_bit_exact(converted, steps, adapter, base):
    root, out, _ = converted
    for step in steps:
        assert "the adapter's too" in _step(converted, step)  # the checks read the adapter back as well
    state = os.path.join(out, "lora-tp2", "mcore_state")
    assert sorted(os.listdir(state)) == ["adapter", "dist_ckpt", "hf_tensors.json", "layout.json"]
    assert os.listdir(os.path.join(state, "adapter")) == ["adapter_config.json"]
    expected, got = _tensors(os.path.join(root, "adapter")), _tensors(os.path.join(out, adapter))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    with open(os.path.join(out, adapter, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and (config["r"], config["lora_alpha"]) == (4, 8)
    source = _tensors(os.path.join(root, "llama"))
    weights = _tensors(os.path.join(out, base))  # the base, unmerged
    assert sorted(weights) == sorted(source) and all(torch.equal(weights[n], t) for n, t in source.items())


def test_merged_export_of_a_checkpoint_with_adapter_state_equals_peft_merge_and_unload(converted):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, out, _ = converted
    _step(converted, "adapter-to-mcore-tp2")
    assert "merged" in _step(converted, "adapter-merged-from-mcore")
    base = AutoModelForCausalLM.from_pretrained(os.path.join(root, "llama"))
    expected = PeftModel.from_pretrained(base, os.path.join(root, "adapter")).merge_and_unload().state_dict()
    got = _tensors(os.path.join(out, "lora-merged"))
    assert sorted(got) == sorted(_tensors(os.path.join(root, "llama")))
    assert not os.path.exists(os.path.join(out, "lora-merged", "adapter"))
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("step,target,words", [
    ("adapter-of-another-base", "refused-other-base", ["does not fit", "v_proj", "different base"]),
    ("merge-without-adapter", "refused-merge", ["--merge-lora needs an adapter", "holds none"]),
    ("adapter-not-lora", "refused-not-lora", ["not an HF PEFT adapter folder", "adapter_config.json"]),
])
def test_adapter_that_cannot_convert_is_refused_before_anything_is_written(converted, step, target, words):
    _, out, record = converted
    assert record["steps"][step] == 1, record["output"][step]
    for word in words:
        assert word in record["output"][step], record["output"][step]
    assert not os.path.exists(os.path.join(out, target))


def test_non_empty_target_is_refused_and_left_untouched(converted):
    _, out, record = converted
    assert record["steps"]["into-non-empty"] == 1
    assert "not an empty folder" in record["output"]["into-non-empty"]
    assert os.listdir(os.path.join(out, "occupied")) == ["notes.txt"]


@pytest.mark.parametrize("case,words", [
    ("other-query-groups", ["tp=2", "2 query groups", "tp=1", "convert"]),
    ("interrupted", ["interrupted", "metadata"]),
])
def test_what_cannot_load_is_refused(converted, case, words):
    error = converted[2]["errors"][case]
    assert error is not None, f"{case} was accepted"
    assert error["type"] == "CheckpointError"
    for word in words:
        assert word in error["message"], error["message"]


def test_training_does_not_resume_from_a_weights_only_checkpoint(converted):
    from mcore_transformers.errors import TrainingError
    from mcore_transformers.training.checkpoint import load_model_state

    _step(converted, "llama-to-mcore-tp2")
    with pytest.raises(TrainingError, match="weights only.*from_pretrained"):
        load_model_state(os.path.join(converted[1], "llama-tp2"), None, None)
