"""Mixture-of-experts and multi-latent attention against transformers, the oracle.

Families: qwen3_moe, qwen2_moe (shared expert with a sigmoid gate, one dense layer), mixtral (sliding
window), olmoe (q/k norm over all heads), deepseek_v3 (MLA with YaRN, group-limited sigmoid routing
with a score-correction bias, shared expert, first layer dense), gpt_oss (sinks, biases, clamped
SwiGLU, alternating sliding window, YaRN; its expert biases need etp=1, so it skips tp2sp), glm4_moe (GQA with partial
rotate-half rotary, q/k/v biases, q/k norms; DeepSeek-V3's routing), glm4_moe_lite (MLA whose latent norms keep their
own epsilon, dense and sparse layers from mlp_layer_types), deepseek_v2 (MLA, softmax routing limited to the groups with
the best single score; V2-Lite's greedy routing and q_proj as a second checkpoint), ernie4_5_moe (interleaved rotary,
softmax routing whose choice adds a score-correction bias, a shared expert, MoE on a middle range of layers),
minimax_m2 (q/k norms over all heads, partial rotary, sigmoid routing with a correction bias, no shared expert),
granitemoe (Granite's embedding, residual, score and logit scalars; experts stacked on disk), phimoe (LayerNorms with
biases, SparseMixer top-2 routing, sliding window, q/k/v/o and LM head biases, longrope with its mscale).
Layouts: one process, ep=2, tp=2 with sequence parallelism (experts split over etp=2), tp=2·ep=2
with etp=1, pp=2. Checkpoints in both expert layouts (per-expert, stacked) and with unused MTP
tensors. Each layout is one worker launch (tests/dist_moe_worker.py) that loads every case in turn;
these tests read its records.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_moe_worker import ERRORS, LAYOUTS, MTP_LAYER, PARITY, build_checkpoints, make_batch  # noqa: E402
import launching  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_moe_worker.py")
LAUNCH_TIMEOUT_S = 300
LOGITS_TOLERANCE, LOSS_TOLERANCE = 1e-4, 1e-5  # fp32

PARITY_CASES = [(layout, name) for layout, names in PARITY.items() for name in names]
ERROR_CASES = [case for case in ERRORS]


def _ids(cases):
    return [f"{name}-{layout}" for layout, name in cases]


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("moe-checkpoints"))
    build_checkpoints(root)
    return root


@pytest.fixture(scope="session")
def moe_launch(moe_checkpoints, tmp_path_factory):
    """`moe_launch(layout)`: run the worker for that layout once per session; returns (out folder, log)."""
    return launching.once_per_key(WORKER, moe_checkpoints, tmp_path_factory, "moe",
                                  lambda layout: LAYOUTS[layout]["world"], LAUNCH_TIMEOUT_S)


def _record(moe_launch, layout: str, name: str, rank: int = 0) -> dict:
    out, log = moe_launch(layout)
    crashed = os.path.join(out, name, f"rank{rank}.json")
    if os.path.exists(crashed):
        with open(crashed) as f:
            pytest.fail(f"{name} under {layout} raised on rank {rank}:\n{json.load(f).get('crashed')}")
    path = os.path.join(out, name, f"rank{rank}.pt")
    if not os.path.exists(path):
        pytest.fail(f"{name} under {layout}: no result from rank {rank}. Launch log tail:\n{log[-5000:]}")
    return torch.load(path, weights_only=False)


def _read_folder(folder: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


_HF: dict = {}


def _hf_output(folder: str):
    """transformers' fp32 output on the worker's batch (router aux losses off: output_router_logits=False)."""
    from transformers import AutoModelForCausalLM

    if folder not in _HF:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        batch = make_batch(model.config.vocab_size)
        with torch.no_grad():
            _HF[folder] = (batch, model(**batch), model.num_parameters())
    return _HF[folder]


# ---- forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,name", PARITY_CASES, ids=_ids(PARITY_CASES))
def test_logits_and_loss_match_hf(layout, name, moe_launch, moe_checkpoints):
    batch, expected, _ = _hf_output(os.path.join(moe_checkpoints, name))
    valid = batch["attention_mask"].bool()
    for rank in range(LAYOUTS[layout]["world"]):  # every rank returns the full logits
        record = _record(moe_launch, layout, name, rank)
        assert record["logits"].shape == expected.logits.shape
        diff = (record["logits"] - expected.logits)[valid].abs().max().item()
        assert diff <= LOGITS_TOLERANCE, f"rank {rank}: max |logits - HF| = {diff:.3g} on non-padding positions"
        loss_diff = abs(record["loss"].item() - expected.loss.item())
        assert loss_diff <= LOSS_TOLERANCE, f"rank {rank}: |loss - HF| = {loss_diff:.3g}"


@pytest.mark.parametrize("layout,name", PARITY_CASES, ids=_ids(PARITY_CASES))
def test_num_parameters_match_hf(layout, name, moe_launch, moe_checkpoints):
    _, _, expected = _hf_output(os.path.join(moe_checkpoints, name))
    assert _record(moe_launch, layout, name)["num_parameters"] == expected


# ---- export -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,name", PARITY_CASES, ids=_ids(PARITY_CASES))
def test_save_round_trips_bit_exact(layout, name, moe_launch, moe_checkpoints):
    """Same names (the source's expert layout, unused MTP tensors included), same bytes."""
    _record(moe_launch, layout, name)
    source = _read_folder(os.path.join(moe_checkpoints, name))
    saved = _read_folder(os.path.join(moe_launch(layout)[0], name, "saved"))
    assert sorted(saved) == sorted(source)
    different = [key for key in source if not torch.equal(source[key], saved[key])]
    assert not different, f"{len(different)} tensors differ from the source, e.g. {different[:4]}"


@pytest.mark.parametrize("layout,name", PARITY_CASES, ids=_ids(PARITY_CASES))
def test_export_hf_weights_gives_every_rank_every_tensor(layout, name, moe_launch, moe_checkpoints):
    source = _read_folder(os.path.join(moe_checkpoints, name))
    unused = {key for key in source if key.startswith(f"model.layers.{MTP_LAYER}.")} if "mtp" in name else set()
    for rank in range(LAYOUTS[layout]["world"]):
        exported = _record(moe_launch, layout, name, rank)["exported"]
        assert sorted(exported) == sorted(set(source) - unused)
        for key, (shape, dtype, digest) in exported.items():
            data = source[key].contiguous()
            assert shape == list(data.shape) and dtype == str(data.dtype), key
            assert digest == hashlib.sha256(data.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest(), key


def test_each_ep_rank_reads_only_its_experts(moe_launch, moe_checkpoints):
    """ep=2: a rank reads every non-expert tensor and the experts it owns (global = local + E/ep · rank)."""
    name = "qwen3_moe"
    with safe_open(os.path.join(moe_checkpoints, name, "model.safetensors"), framework="pt") as f:
        sizes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    num_experts = 4

    def nbytes(key):
        count = 1
        for size in sizes[key]:
            count *= size
        return count * 4  # float32

    for rank in range(2):
        owned = set(range(rank * num_experts // 2, (rank + 1) * num_experts // 2))
        expected = sum(
            nbytes(key) for key in sizes
            if ".mlp.experts." not in key or int(key.split(".mlp.experts.")[1].split(".")[0]) in owned
        )
        assert _record(moe_launch, "ep2", name, rank)["bytes_read"] == expected


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_bad_input_raises_clear_error_before_reading(case, moe_launch, moe_checkpoints):
    name, layout, checkpoint, _, expected, words = case
    out, log = moe_launch(layout)
    for rank in range(LAYOUTS[layout]["world"]):  # every rank raises: none is left waiting
        path = os.path.join(out, name, f"rank{rank}.json")
        if not os.path.exists(path):
            pytest.fail(f"{name}: no record from rank {rank}. Launch log tail:\n{log[-5000:]}")
        with open(path) as f:
            record = json.load(f)
        assert record["raised"] is not None, f"rank {rank}: nothing was raised"
        assert expected in record["raised"]["mro"], f"rank {rank} raised {record['raised']}"
        message = record["raised"]["message"]
        for word in words:
            assert word.lower() in message.lower(), f"{word!r} not in: {message}"
        assert record["unchanged"], "the checkpoint folder changed"
