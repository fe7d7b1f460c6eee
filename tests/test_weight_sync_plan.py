"""mcore_transformers.vllm without vLLM: the bucket plan, and the engine-side check of an update (the worker
extension's method, on a stand-in worker that serves a checkpoint written by transformers)."""

from __future__ import annotations

import types

import pytest
import torch

from mcore_transformers.vllm import WeightReceiver, WeightSyncError, bucket_views, plan_buckets


def test_buckets_pack_whole_aligned_tensors_in_order():
    specs = [("a", (10, 10), torch.float32), ("b", (3,), torch.bfloat16), ("c", (50,), torch.float32), ("d", (2, 2), torch.int64)]
    buckets = plan_buckets(specs, bucket_bytes=512)
    assert [[item[0] for item in bucket.items] for bucket in buckets] == [["a", "b"], ["c", "d"]]
    assert all(offset % 64 == 0 for bucket in buckets for *_, offset in bucket.items)
    buffer = torch.zeros(buckets[1].nbytes, dtype=torch.uint8)
    views = dict(bucket_views(buffer, buckets[1]))
    views["c"].copy_(torch.arange(50.0))
    views["d"].copy_(torch.tensor([[1, 2], [3, 4]]))
    again = dict(bucket_views(buffer, buckets[1]))
    assert torch.equal(again["c"], torch.arange(50.0)) and again["d"].tolist() == [[1, 2], [3, 4]]
    with pytest.raises(WeightSyncError, match="more than bucket_bytes"):
        plan_buckets(specs, bucket_bytes=100)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from transformers import AutoConfig

    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    folder = str(tmp_path_factory.mktemp("served"))
    make_tiny_checkpoint(folder, "llama")
    config = AutoConfig.from_pretrained(folder)
    runner = types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=config, model=folder))
    return types.SimpleNamespace(model_runner=runner, config=config)


def _specs(worker):
    from safetensors import safe_open

    with safe_open(f"{worker.model_runner.model_config.model}/model.safetensors", "pt") as handle:
        return [(name, list(handle.get_slice(name).get_shape()), "torch.float32") for name in handle.keys()]


def test_engine_accepts_the_update_of_its_own_model(worker):
    assert WeightReceiver.mcore_check(worker, _specs(worker), {"vocab_size": worker.config.vocab_size})["tensors"] > 0


def test_engine_refuses_unknown_names_other_shapes_and_other_sizes(worker):
    specs = _specs(worker)
    specs[0] = ("model.layers.0.self_attn.q_proj.lora_A.weight", specs[0][1], specs[0][2])
    specs[1] = (specs[1][0], [7, 7], specs[1][2])
    with pytest.raises(WeightSyncError) as err:
        WeightReceiver.mcore_check(worker, specs, {})
    assert "lora_A" in str(err.value) and "(7, 7)" in str(err.value) and "Nothing was applied" in str(err.value)
    with pytest.raises(WeightSyncError, match="another model: vocab_size"):
        WeightReceiver.mcore_check(worker, _specs(worker), {"vocab_size": 12345})
