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
tensors. bf16 loads of the families whose transformers router rounds elsewhere than megatron's (float32 router
weights, float32 scores of bf16 logits; one checkpoint with the published dtypes): their routers, given the same
input, choose transformers' experts with its weights. Each layout is one worker launch (tests/dist_moe_worker.py) that loads every case in turn;
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

from dist_moe_worker import BF16_CASES, ERRORS, LAYOUTS, MTP_LAYER, PARITY, build_checkpoints, make_batch  # noqa: E402
import launching  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_moe_worker.py")
LAUNCH_TIMEOUT_S = 300
# fp32: the bounds; bf16: test_parity.py's (mcore and HF round differently inside every layer)
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-3)}

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


def _source(name: str) -> tuple[str, torch.dtype]:
    """The checkpoint a case loads and the dtype it loads it in."""
    return (BF16_CASES[name], torch.bfloat16) if name in BF16_CASES else (name, torch.float32)


_HF: dict = {}


def _hf_model(folder: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _hf_output(folder: str, dtype: torch.dtype = torch.float32):
    """transformers' output on the worker's batch (router aux losses off: output_router_logits=False)."""
    if (folder, dtype) not in _HF:
        model = _hf_model(folder, dtype)
        batch = make_batch(model.config.vocab_size)
        with torch.no_grad():
            _HF[folder, dtype] = (batch, model(**batch), model.num_parameters())
    return _HF[folder, dtype]


def _expected_saved(checkpoints: str, name: str, tmp_path) -> dict[str, torch.Tensor]:
    """What a save must write: the source's tensors, cast to the load dtype except those transformers keeps in float32
    (it saves them as float32: `_keep_in_fp32_modules_strict`), which are written as read."""
    checkpoint, dtype = _source(name)
    source = _read_folder(os.path.join(checkpoints, checkpoint))
    if dtype == torch.float32:
        return source
    _hf_model(os.path.join(checkpoints, checkpoint), dtype).save_pretrained(str(tmp_path / "hf-saved"))
    kept = {key for key, tensor in _read_folder(str(tmp_path / "hf-saved")).items() if tensor.dtype == torch.float32}
    return {key: tensor if key in kept else tensor.to(dtype) for key, tensor in source.items()}


# ---- forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,name", PARITY_CASES, ids=_ids(PARITY_CASES))
def test_logits_and_loss_match_hf(layout, name, moe_launch, moe_checkpoints):
    checkpoint, dtype = _source(name)
    batch, expected, _ = _hf_output(os.path.join(moe_checkpoints, checkpoint), dtype)
    valid = batch["attention_mask"].bool()
    logits_tolerance, loss_tolerance = TOLERANCES[dtype]
    for rank in range(LAYOUTS[layout]["world"]):  # every rank returns the full logits
        record = _record(moe_launch, layout, name, rank)
        assert record["logits"].shape == expected.logits.shape and record["logits"].dtype == expected.logits.dtype
        diff = (record["logits"].float() - expected.logits.float())[valid].abs().max().item()
        assert diff <= logits_tolerance, f"rank {rank}: max |logits - HF| = {diff:.3g} on non-padding positions"
        loss_diff = abs(record["loss"].item() - expected.loss.item())
        assert loss_diff <= loss_tolerance, f"rank {rank}: |loss - HF| = {loss_diff:.3g}"


@pytest.mark.parametrize("layout,name", PARITY_CASES, ids=_ids(PARITY_CASES))
def test_num_parameters_match_hf(layout, name, moe_launch, moe_checkpoints):
    _, _, expected = _hf_output(os.path.join(moe_checkpoints, _source(name)[0]), _source(name)[1])
    assert _record(moe_launch, layout, name)["num_parameters"] == expected


# ---- export -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,name", PARITY_CASES, ids=_ids(PARITY_CASES))
def test_save_round_trips_bit_exact(layout, name, moe_launch, moe_checkpoints, tmp_path):
    """Same names (the source's expert layout, unused MTP tensors included), same bytes."""
    _record(moe_launch, layout, name)
    source = _expected_saved(moe_checkpoints, name, tmp_path)
    saved = _read_folder(os.path.join(moe_launch(layout)[0], name, "saved"))
    assert sorted(saved) == sorted(source)
    different = [key for key in source if not torch.equal(source[key], saved[key])]
    assert not different, f"{len(different)} tensors differ from the source, e.g. {different[:4]}"


@pytest.mark.parametrize("layout,name", PARITY_CASES, ids=_ids(PARITY_CASES))
def test_export_hf_weights_gives_every_rank_every_tensor(layout, name, moe_launch, moe_checkpoints, tmp_path):
    source = _expected_saved(moe_checkpoints, name, tmp_path)
    unused = {key for key in source if key.startswith(f"model.layers.{MTP_LAYER}.")} if "mtp" in name else set()
    for rank in range(LAYOUTS[layout]["world"]):
        exported = _record(moe_launch, layout, name, rank)["exported"]
        assert sorted(exported) == sorted(set(source) - unused)
        for key, (shape, dtype, digest) in exported.items():
            data = source[key].contiguous()
            assert shape == list(data.shape) and dtype == str(data.dtype), key
            assert digest == hashlib.sha256(data.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest(), key


BF16_ROUTER_CASES = [(layout, name) for layout, name in PARITY_CASES if name in BF16_CASES]


def _hf_router_calls(model, batch) -> list:
    """transformers' MoE routers (modules named gate / router that are not plain linears) with the arguments of their
    calls in one forward, in layer order."""
    routers = [module for path, module in model.named_modules() if path.endswith((".gate", ".router"))
               and type(module) is not torch.nn.Linear]
    calls: list = []
    handles = [router.register_forward_hook(lambda module, args, out: calls.append((module, args))) for router in routers]
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    return calls


@pytest.mark.parametrize("layout,name", BF16_ROUTER_CASES, ids=_ids(BF16_ROUTER_CASES))
def test_routers_route_as_hf_in_bf16(layout, name, moe_launch, moe_checkpoints):
    """Every MoE layer's router, given the input our bf16 model gave it, chooses transformers' experts with its weights
    (dtype included, to a float32 rounding): transformers' bf16 router arithmetic (`router_precision`)."""
    checkpoint, dtype = _source(name)
    model = _hf_model(os.path.join(moe_checkpoints, checkpoint), dtype)
    calls = _hf_router_calls(model, make_batch(model.config.vocab_size))
    records = _record(moe_launch, layout, name)["routers"]
    assert len(records) == len(calls) > 0
    for layer, ((hidden, probs, routing_map), (router, args)) in enumerate(zip(records, calls)):
        with torch.no_grad():
            out = router(hidden, *args[1:])
        chosen = next(t for t in out if not t.is_floating_point()).long()
        weights = next(t for t in out if t.is_floating_point() and t.shape == chosen.shape)
        expected_map = torch.zeros_like(routing_map).scatter(1, chosen, True)
        differ = (expected_map != routing_map).any(-1).sum().item()
        assert differ == 0, f"MoE layer {layer}: {differ} of {len(hidden)} tokens routed to other experts than HF's"
        ours = probs.gather(1, chosen)
        assert ours.dtype == weights.dtype, f"MoE layer {layer}: weights in {ours.dtype}, HF's in {weights.dtype}"
        torch.testing.assert_close(ours, weights, rtol=0, atol=1e-6, msg=f"MoE layer {layer}: routing weights")


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
