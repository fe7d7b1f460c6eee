"""The parts of the model transformers scripts touch, under every layout: vocabulary views and resizing (against
transformers' own resize), hidden states, input gradients, and from_pretrained's transformers keywords."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_surface_worker as W  # noqa: E402
from launching import launch_together  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_surface_worker.py")
LAUNCHES = {"tp1": ["tp1"], "world2": ["tp2", "pp2", "tp2sp"]}
TIMEOUT_S = 400


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("surface-checkpoints"))
    W.build(root)
    return root


@pytest.fixture(scope="module")
def results(checkpoints, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("surface-results"))
    runs = {launch: ([out, checkpoints, ",".join(layouts)], 1 if launch == "tp1" else 2) for launch, layouts in LAUNCHES.items()}
    logs = {launch: log for launch, (_, log) in launch_together(WORKER, runs, out, TIMEOUT_S).items()}

    def get(layout: str, checkpoint: str, rank: int) -> dict:
        path = os.path.join(out, layout, f"rank{rank}.json")
        launch = next(name for name, layouts in LAUNCHES.items() if layout in layouts)
        if not os.path.exists(path):
            pytest.fail(f"no results for {layout} rank {rank}; log:\n{logs[launch][-5000:]}")
        record = json.load(open(path))[checkpoint]
        if "error" in record:
            pytest.fail(f"{layout}/{checkpoint} rank {rank} raised: {record['error']}\n{record['traceback']}")
        return record

    return get


CASES = [(layout, checkpoint, rank) for layout in ("tp1", "tp2", "pp2", "tp2sp") for checkpoint in W.CHECKPOINTS
         for rank in range(1 if layout == "tp1" else 2)]


@pytest.mark.parametrize("layout,checkpoint,rank", CASES, ids=[f"{l}-{c}-rank{r}" for l, c, r in CASES])
def test_vocabulary_views_writes_and_resize_equal_transformers(results, layout, checkpoint, rank):
    record = results(layout, checkpoint, rank)
    assert record["view_shape"] == [250, 64] and record["view_equals_hf"] and record["head_equals_hf"]
    assert record["write_logits_diff"] < 1e-5
    # +7 rows (250 → 257, padded to 258 at tp=2), padded to a multiple of 64 (320), shrunk to 240
    for step, vocab in enumerate((257, 320, 240)):
        resized = record[f"resize{step}"]
        assert resized["vocab"] == [vocab, vocab] and resized["returned_rows"] == vocab, resized
        assert resized["embeddings_equal"] and resized["head_equal"], resized  # the same random draws, bit for bit
        assert resized["logits_diff"] < 1e-5, resized
    if rank == 0:
        assert record["saved_vocab"] == 240 and record["saved_keys_equal"] and record["saved_equal"]


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "tp2sp"])
def test_hidden_states_input_grads_and_rank_agreement(results, layout):
    for rank in range(1 if layout == "tp1" else 2):
        record = results(layout, "untied", rank)
        if layout == "pp2":
            assert "pp=2" in record["hidden_states"]["error"] and "pp=1" in record["hidden_states"]["error"]
        else:
            assert record["hidden_states"]["count"] == [5, 5] and record["hidden_states"]["max_diff"] < 1e-5
            assert record["input_require_grads"] and not record["input_require_grads_off"]
        if layout != "tp1":
            message = record["different_inputs"]
            assert message and "different input_ids" in message and "MCoreTrainer" in message


# ---- from_pretrained takes transformers' keywords (one process) -----------------------------------
@pytest.fixture(scope="module")
def tiny(checkpoints):
    return os.path.join(checkpoints, "untied")


def _load(folder, **kwargs):
    from mcore_transformers import MCoreModelForCausalLM

    return MCoreModelForCausalLM.from_pretrained(folder, **kwargs)


@pytest.fixture(autouse=False)
def teardown():
    yield
    from mcore_transformers import destroy_parallel_state

    destroy_parallel_state()


def test_run_clm_keywords_and_config_objects_are_used(tiny, teardown):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny)
    config.attention_dropout, config.use_cache = 0.25, False
    model = _load(tiny, from_tf=False, config=config, cache_dir=None, revision="main", token=None,
                  trust_remote_code=False, dtype=None, low_cpu_mem_usage=True, attn_implementation="sdpa",
                  device_map="auto", use_safetensors=True)
    assert model.config.attention_dropout == 0.25 and model.config.use_cache is False
    assert model.chunks[0].config.attention_dropout == 0.25  # reached megatron's TransformerConfig
    assert config.attention_dropout == 0.25 and config is not model.config  # transformers copies the object too
    model = _load(tiny, attention_dropout=0.5, use_cache=True)  # config attributes as keywords
    assert model.config.attention_dropout == 0.5


def test_loading_info_subfolder_and_variant(tiny, tmp_path, teardown):
    import shutil

    nested = tmp_path / "repo" / "text"
    shutil.copytree(tiny, nested)
    os.rename(nested / "model.safetensors", nested / "model.fp32.safetensors")
    model, info = _load(str(tmp_path / "repo"), subfolder="text", variant="fp32", output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert model.num_parameters() > 0


@pytest.mark.parametrize("kwargs,words", [
    ({"quantization_config": {"load_in_4bit": True}}, ["quantization_config", "dtype="]),
    ({"load_in_8bit": True}, ["load_in_8bit"]),
    ({"from_tf": True}, ["from_tf", "safetensors"]),
    ({"device_map": {"model.layers.0": 0, "lm_head": "cpu"}}, ["device_map", "tp=N", "pp=M"]),
    ({"device_map": "balanced"}, ["device_map", "places layers"]),
    ({"device_map": "cuda:0"} if not torch.cuda.is_available() else {"device_map": "cpu"}, ["device_map", "asks for"]),
    ({"use_safetensors": False}, ["use_safetensors=False", "safetensors"]),
    ({"tp_plan": "auto"}, ["tp_plan", "tp="]),
    ({"no_such_option": 1}, ["no_such_option", "neither"]),
])
def test_keywords_that_cannot_be_honoured_are_refused(tiny, kwargs, words):
    with pytest.raises((ValueError, TypeError)) as err:
        _load(tiny, **kwargs)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
