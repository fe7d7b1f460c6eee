"""generate() on the mcore model vs transformers' generate on the same checkpoint (fp32), token for token.

Two launches cover every layout: plain `python` for tp1, and one `torchrun --nproc_per_node=2` that runs
tp2, pp2 and pp2·vpp2 one after another (tests/dist_generate_worker.py). Each launch writes per-rank
JSON; the tests here compare every rank with the transformers oracle computed in this process.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_generate_worker as W  # noqa: E402
from dist_cases import oracle_options  # noqa: E402
from launching import launch_together  # noqa: E402

pytestmark = pytest.mark.compat  # all of generate is in the compatibility subset (./dev compat oldest)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_generate_worker.py")
LAUNCHES = {"tp1": ["tp1"], "world2": ["tp2", "pp2", "pp2vpp2", "tp2sp", "ep2"]}
LAUNCH_OF = {layout: launch for launch, layouts in LAUNCHES.items() for layout in layouts}
TIMEOUT_S = 400


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("generate-checkpoints"))
    W.build_checkpoints(root)
    return root


@pytest.fixture(scope="module")
def launches(checkpoints, tmp_path_factory) -> dict:
    """Both launches, started together; {launch: (out folder, returncode, log)}."""
    out = str(tmp_path_factory.mktemp("generate-results"))
    runs = {launch: ([out, checkpoints, ",".join(layouts)], W.LAYOUTS[layouts[0]]["world"])
            for launch, layouts in LAUNCHES.items()}
    return {launch: (out, *result) for launch, result in launch_together(WORKER, runs, out, TIMEOUT_S).items()}


def _records(launches, layout: str) -> list[dict]:
    out, code, log = launches[LAUNCH_OF[layout]]
    records = []
    for rank in range(W.LAYOUTS[layout]["world"]):
        path = os.path.join(out, layout, f"rank{rank}.json")
        if not os.path.exists(path):
            pytest.fail(f"no results from rank {rank} for {layout} (launch exit code {code}); log tail:\n{log[-5000:]}")
        with open(path) as f:
            records.append(json.load(f))
    return records


def _entry(record: dict, case: str, rank: int) -> dict:
    entry = record.get(case)
    assert entry is not None, f"{case} did not run on rank {rank}"
    if entry.get("error"):
        pytest.fail(f"{case} raised on rank {rank}: {entry['error']['type']}: {entry['error']['message']}\n{entry.get('traceback', '')}")
    return entry


@pytest.fixture(scope="module")
def oracle(checkpoints):
    """`oracle(case, eos)`: transformers' generate ids for a case (cached)."""
    import torch
    from transformers import AutoModelForCausalLM

    models, answers = {}, {}

    def get(case: str, eos=None, rank: int = 0) -> list:
        key = (case, eos, rank if case == "moe-per-rank" else 0)
        if key not in answers:
            checkpoint, kind, _, sampled = W.CASES[case]
            folder = os.path.join(checkpoints, checkpoint)
            if folder not in models:
                models[folder] = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=torch.float32, **oracle_options(folder)
                ).eval()
            kwargs = W.generate_kwargs(case, eos, checkpoints)
            if case in W.RECOMPUTED_BY_TRANSFORMERS:
                kwargs["use_cache"] = False
            ids, mask = W.make_prompts(kind)
            if case == "moe-per-rank":
                seed, kwargs["max_new_tokens"] = W.per_rank_settings(rank)
                ids, mask = W.make_prompts(kind, seed)
            if sampled:
                torch.manual_seed(W.SAMPLING_SEED)
            answers[key] = models[folder].generate(ids, attention_mask=mask, **kwargs).tolist()
        return answers[key]

    return get


def _generate_cases():
    for layout in LAUNCH_OF:
        cases = W.cases_for(layout) + (["after-errors"] if layout in W.MAIN_LAYOUTS else [])
        for case in cases:
            yield pytest.param(layout, case, id=f"{layout}-{case}")


@pytest.mark.parametrize("layout,case", list(_generate_cases()))
def test_generate_matches_transformers(launches, oracle, layout, case):
    """Every rank returns exactly transformers' ids (greedy, beams, seeded sampling, no cache, stops)."""
    records = _records(launches, layout)
    entries = [_entry(record, case, rank) for rank, record in enumerate(records)]
    for rank, entry in enumerate(entries):
        expected = oracle(case, entries[0].get("eos"), rank)
        assert entry["ids"] == expected, f"{layout} rank {rank}: {case} differs from transformers"
    if case == "moe-per-rank":  # the replicas really generated different prompts to different lengths
        assert entries[0]["ids"] != entries[1]["ids"] and entries[0]["new_tokens"] != entries[1]["new_tokens"]
    if case == "eos":  # the chosen eos really stopped a row early (the rest of it is padding)
        prompt = len(W.make_prompts("padded")[0][0])
        assert any(W.PAD in row[prompt:] for row in expected)
    if case == "stopping-criteria":
        assert len(expected[0]) == 9 + 7
    if case.startswith("assisted-"):  # candidates were really rejected and cropped from the cache, and the
        assert all(entry["rollbacks"] > 0 for entry in entries), [e["rollbacks"] for e in entries]
        new = expected[0][len(W.make_prompts(W.CASES[case][1])[0][0]):]
        assert len(set(new)) > 4, new  # output is no degenerate repetition


DENSE_LAYOUTS = [layout for layout in LAUNCH_OF if layout != "ep2"]  # ep2 runs the MoE cases only


@pytest.mark.parametrize("layout", DENSE_LAYOUTS)
def test_streamer_on_rank0_only(launches, layout):
    records = _records(launches, layout)
    streamed = [_entry(record, "greedy-padded-llama", rank)["streamed"] for rank, record in enumerate(records)]
    assert streamed[0] == {"puts": 1 + 24, "ended": True}  # the prompt, then one put per new token
    assert all(s == {"puts": 0, "ended": False} for s in streamed[1:])


@pytest.mark.parametrize("layout,case", [(l, c) for l in DENSE_LAYOUTS for c in ("manual-cache-loop",)])
def test_forward_with_cache_matches_full_forward(launches, layout, case):
    """forward(use_cache=True) then one-token steps (cache grown on demand) = one forward over everything."""
    for rank, record in enumerate(_records(launches, layout)):
        entry = _entry(record, case, rank)
        assert entry["cached_tokens"] == 9 + 6
        assert entry["max_diff"] < 1e-5, entry
        assert entry["keep_diff"] < 1e-5 and entry["keep_shape"] == [3, 1, 250], entry


BAD_INPUT_MESSAGES = {
    "prompt-too-long": ("300 tokens", "max_position_embeddings=256", "Shorten"),
    "cache-too-big": ("KV cache", "GiB", "Lower the batch size"),
    "foreign-cache": ("MCoreKVCache", "DynamicCache"),
    "cache-wrong-rows": ("2 rows", "runs 3"),
    "cache-not-passed": ("generate() built an MCoreKVCache", "forward received no cache", "tested range"),
}


@pytest.mark.parametrize("layout,case", [(l, c) for l in W.MAIN_LAYOUTS for c in W.ERROR_CASES])
def test_bad_input_is_refused_clearly(launches, layout, case):
    """The same GenerationError (a ValueError) on every rank, naming the cause and the fix; no hang after."""
    records = _records(launches, layout)
    errors = [record[case]["error"] for record in records]
    for error in errors:
        assert error is not None, f"{case} was accepted"
        assert error["type"] == "GenerationError" and {"MCoreTransformersError", "ValueError"} <= set(error["mro"])
        for phrase in BAD_INPUT_MESSAGES[case]:
            assert phrase in error["message"], error["message"]
    assert len({e["message"].split(" on this rank")[0] for e in errors}) == 1


def test_cache_reorder_crop_and_growth():
    """MCoreKVCache bookkeeping on its own: beams reorder rows in place, crop rolls back, reserve keeps data."""
    import torch

    from mcore_transformers.model.cache import GenerationError, MCoreKVCache

    cache = MCoreKVCache(batch_size=3, max_length=4, device=torch.device("cpu"), layer_numbers=[1])
    key = torch.arange(4 * 3 * 2 * 1, dtype=torch.float32).view(4, 3, 2, 1)
    cache.context.key_value_memory_dict[1] = (key.clone(), -key.clone())
    cache.begin_step(torch.tensor([[0, 1, 2], [5, 6, 7], [8, 9, 10]]))
    cache.end_step(3)
    assert cache.get_seq_length() == 3
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    k, v = cache.context.key_value_memory_dict[1]
    assert torch.equal(k[:3], key[:3, [2, 2, 0]]) and torch.equal(v[:3], -key[:3, [2, 2, 0]])
    assert torch.equal(k[3], key[3])  # slots beyond the cached length are untouched
    assert cache.positions[0, :, :3].tolist() == [[8, 9, 10], [8, 9, 10], [0, 1, 2]]
    cache.reserve(10)
    assert cache.max_length >= 10 and torch.equal(cache.context.key_value_memory_dict[1][0][:3], k[:3])
    cache.crop(0)  # transformers: remove nothing (assisted decoding calls this after accepting every candidate)
    assert cache.get_seq_length() == 3
    cache.crop(-1)
    assert cache.get_seq_length() == 2
    with pytest.raises(GenerationError, match="holds 3 rows"):
        cache.begin_step(torch.zeros(2, 1, dtype=torch.long))


def test_cache_is_a_transformers_cache():
    """What GenerationMixin relies on holds: a public `Cache` with one attention layer per megatron layer."""
    import torch
    from transformers.cache_utils import Cache

    from mcore_transformers.model.cache import GenerationError, MCoreKVCache

    cache = MCoreKVCache(batch_size=2, max_length=8, device=torch.device("cpu"), layer_numbers=[3, 4])
    assert isinstance(cache, Cache) and len(cache) == 2
    assert cache.is_linear == [False, False] and cache.is_sliding == [False, False]  # generate slices by length
    assert cache.is_croppable and not cache.is_compileable and cache.batch_size == 2 and cache.get_max_length() == 8
    assert not cache.layers[0].is_initialized and cache.layers[0].keys is None
    memory = torch.randn(8, 2, 1, 4)
    cache.context.key_value_memory_dict[3] = (memory, memory + 1)
    cache.begin_step(torch.tensor([[0, 1, 2], [0, 0, 1]]))
    cache.end_step(3)
    assert cache.get_seq_length() == 3 and cache.get_mask_sizes(1, 0) == (4, 0)
    assert torch.equal(cache.layers[0].keys, memory[:3].permute(1, 2, 0, 3))  # HF layout [b, heads, s, d]
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4 and cache.positions[0, :, :3].tolist() == [[0, 1, 2], [0, 1, 2], [0, 0, 1], [0, 0, 1]]
    assert torch.equal(cache.layers[0].keys[1], memory[:3, 0].permute(1, 0, 2))
    cache.batch_select_indices(torch.tensor([3, 0]))
    assert cache.batch_size == 2 and cache.positions[0, :, :3].tolist() == [[0, 0, 1], [0, 1, 2]]
    with pytest.raises(GenerationError, match="written by megatron-core's attention"):
        cache.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4), 0)
    cache.reset()
    assert cache.get_seq_length() == 0
