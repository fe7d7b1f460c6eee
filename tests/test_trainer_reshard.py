"""Resuming an MCoreTrainer checkpoint at another tp / pp reshards it through the conversion rule table.

Two launches of tests/dist_trainer_reshard_worker.py (2 processes, then a world of one) train reference
runs that save checkpoint-2 and resume those checkpoints at other layouts:

- resumed losses and grad norms equal the uninterrupted run's (fp32: to ~1e-7, the arithmetic of another
  layout; steps 1-2 come back from trainer_state.json),
- the state itself crosses layouts exactly: loading a checkpoint at another layout and saving it again
  gives back every tensor bit for bit (weights, AdamW moments, fp32 masters, LoRA adapters, tied
  embeddings over pipeline stages, a vocabulary tp pads, routed experts from ep=2 to tp=2),
- what cannot be resharded is refused with TrainingError: another model, another optimizer, factored
  optimizer state.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_trainer_reshard_worker as R  # noqa: E402
import dist_trainer_worker as W  # noqa: E402
import launching  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_trainer_reshard_worker.py")
LAUNCH_TIMEOUT_S = 300
FP32_RTOL = 1e-6


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> tuple[str, str]:
    """Run both launches once; returns (OUT, the launches' logs)."""
    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    root = str(tmp_path_factory.mktemp("reshard-checkpoints"))
    for name in ("llama", "qwen2-tied-v251"):
        model_type, overrides = W.CHECKPOINTS[name]
        make_tiny_checkpoint(os.path.join(root, name), model_type, **overrides)
    make_tiny_checkpoint(os.path.join(root, "qwen3_moe"), "qwen3_moe")
    out = str(tmp_path_factory.mktemp("reshard"))
    logs = ""
    for launch, world in (("pairs", 2), ("single", 1)):
        _, log = launching.launch(WORKER, [launch, root, out], world, LAUNCH_TIMEOUT_S,
                                  os.path.join(out, f"{launch}.log"))
        logs += f"--- {launch}:\n{log[-6000:]}\n"
    return out, logs


def record(outputs, run: str) -> dict:
    out, logs = outputs
    return launching.worker_record(out, run, logs)


def checkpoint(outputs, run: str) -> str:
    return R.checkpoint_of(outputs[0], run)


RESUMED = {name: spec for launch in R.RESUMES.values() for name, spec in launch.items()}
ROUND_TRIPS = {name: spec for launch in R.ROUND_TRIPS.values() for name, spec in launch.items()}


@pytest.mark.parametrize("run", sorted(RESUMED))
def test_resharded_resume_continues_the_run(outputs, run):
    reference = RESUMED[run][0]
    resumed, uninterrupted = record(outputs, run)["train"], record(outputs, reference)["train"]
    assert resumed["steps"] == uninterrupted["steps"] == [1, 2, 3, 4]
    assert resumed["loss"][:2] == uninterrupted["loss"][:2]  # from trainer_state.json
    assert resumed["learning_rate"] == uninterrupted["learning_rate"]
    # fp32: the other layout's arithmetic (~1e-7). bf16: the weights are bit-identical (see the round trip),
    # the layout's bf16 arithmetic differs (~2e-5 on the loss, ~1e-3 on the gradient norm).
    bf16 = R.REFERENCES[reference][2].get("args", {}).get("bf16", False)
    rtol = (1e-4, 5e-3) if bf16 else (FP32_RTOL, FP32_RTOL)
    torch.testing.assert_close(resumed["loss"], uninterrupted["loss"], rtol=rtol[0], atol=0)
    torch.testing.assert_close(resumed["grad_norm"], uninterrupted["grad_norm"], rtol=rtol[1], atol=0)


def _safetensors(folder: str) -> list[str]:
    found = []
    for parent, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(parent, n), folder) for n in names if n.endswith(".safetensors")]
    return sorted(found)


def _dist_checkpoint_tensors(checkpoint: str, scratch: str) -> dict:
    """Every tensor of mcore_state/dist_ckpt/ at its global shape (torch's reader, no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    os.makedirs(scratch, exist_ok=True)
    target = os.path.join(scratch, "whole.pt")
    dcp_to_torch_save(os.path.join(checkpoint, "mcore_state", "dist_ckpt"), target)
    return torch.load(target, weights_only=False)


@pytest.mark.parametrize("run", sorted(ROUND_TRIPS))
def test_state_crosses_layouts_bit_for_bit(outputs, run, tmp_path):
    """checkpoint-2 loaded at another layout and saved again from there equals the original, tensor for tensor."""
    from safetensors.torch import load_file

    record(outputs, run)
    original, again = checkpoint(outputs, ROUND_TRIPS[run][0]), checkpoint(outputs, run)
    if os.path.isdir(os.path.join(original, "mcore_state", "dist_ckpt")):  # megatron-core's optimizer
        first = _dist_checkpoint_tensors(original, str(tmp_path / "a"))  # flat: {global key: tensor or object}
        second = _dist_checkpoint_tensors(again, str(tmp_path / "b"))
        tensors = [k for k, v in first.items() if isinstance(v, torch.Tensor)]
        assert any(".exp_avg_sq." in k for k in tensors) and "embedding.word_embeddings.weight" in tensors
        assert set(tensors) == {k for k, v in second.items() if isinstance(v, torch.Tensor)}
        for key in tensors:
            a, b = first[key], second[key]
            if a.shape != b.shape:  # the vocabulary is padded to a multiple of tp (251 rows -> 252 at tp=2)
                assert ("word_embeddings" in key or "output_layer" in key) and a.shape[1:] == b.shape[1:], key
                rows = min(a.shape[0], b.shape[0])
                a, b = a[:rows], b[:rows]
            assert torch.equal(a, b), key
        return
    files = _safetensors(original)
    assert files == _safetensors(again)
    assert any(f.startswith("mcore_state/hf_optimizer/exp_avg_sq/") for f in files)
    for name in files:
        first, second = load_file(os.path.join(original, name)), load_file(os.path.join(again, name))
        assert first.keys() == second.keys(), name
        for key in first:
            assert torch.equal(first[key], second[key]), f"{name}: {key}"
    meta = "mcore_state/hf_optimizer/meta.pt"
    assert str(torch.load(os.path.join(original, meta))) == str(torch.load(os.path.join(again, meta)))


def test_layout_free_state_is_hf_named(outputs):
    from safetensors import safe_open

    record(outputs, "torch-tp2-bf16")
    folder = checkpoint(outputs, "torch-tp2-bf16")
    state = os.path.join(folder, "mcore_state", "hf_optimizer")
    assert sorted(os.listdir(state)) == ["exp_avg", "exp_avg_sq", "master", "meta.pt"]
    meta = torch.load(os.path.join(state, "meta.pt"), weights_only=True)
    assert meta["problem"] is None and meta["optimizer"] == "torch.optim.adamw.AdamW" and meta["masters"]
    assert meta["tensor_keys"] == ["exp_avg", "exp_avg_sq"]
    assert len(meta["param_groups"]) == 2 and meta["param_groups"][0]["weight_decay"] == 0.1
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as weights:
        shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}
    # one entry per trainable parameter, named by its first HF tensor (q_proj for the fused linear_qkv)
    assert set(meta["entries"]) < set(shapes) and "model.layers.0.self_attn.q_proj.weight" in meta["entries"]
    assert all(float(info["scalars"]["step"]) == 2 for info in meta["entries"].values())
    for key in ("exp_avg", "exp_avg_sq", "master"):
        with safe_open(os.path.join(state, key, "model.safetensors"), "pt") as tensors:
            assert {name: tensors.get_slice(name).get_shape() for name in tensors.keys()} == shapes
            assert all(tensors.get_tensor(name).dtype == torch.float32 for name in tensors.keys())


@pytest.mark.parametrize("case,words", [
    ("other_model", ["does not fit this model", "linear_qkv.bias"]),
    ("other_optimizer", ["AdamW", "SGD", "optim"]),
    ("factored_state", ["cannot be resharded", "tp=2", "tp=1", "from_pretrained"]),
    ("ep_side", ["ep=2", "ep=1", "megatron_optimizer=False"]),
])
def test_what_cannot_be_resharded_is_refused(outputs, case, words):
    error = record(outputs, "refusals")["errors"][case]
    assert error is not None, f"{case} was accepted"
    assert error["type"] == "TrainingError"
    for word in words:
        assert word in error["message"], error["message"]
