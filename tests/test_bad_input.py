"""Bad inputs are refused with an mcore_transformers.errors exception that names the cause and the fix,
before anything is written.

End to end: each case in dist_cases.ERROR_RUNS went through `from_pretrained` / `save_pretrained` in a
worker launch (a world of one, or torchrun with 2 ranks where the layout needs them). Units: the
checks themselves (layout arithmetic, reader, save target, hub resolution), called directly in-process
(none of them touches torch.distributed).
"""

from __future__ import annotations

import os

import pytest

from dist_cases import ERROR_RUNS, NOTES_TEXT

from mcore_transformers import errors
from mcore_transformers.architectures import get_architecture
from mcore_transformers.model.building import check_model_fits, query_groups_for
from mcore_transformers.conversion.reader import CheckpointReader
from mcore_transformers.conversion.writer import check_save_target
from mcore_transformers.conversion.hub import resolve_checkpoint
from mcore_transformers.runtime.parallel import ParallelConfig
from mcore_transformers.tools.tiny import tiny_config


def by_id(runs):
    return pytest.mark.parametrize("case", runs, ids=[case.id for case in runs])


def assert_names(message: str, words) -> None:
    missing = [word for word in words if word.lower() not in message.lower()]
    assert not missing, f"the message does not mention {missing}: {message!r}"


# ---- end to end ---------------------------------------------------------------------------------
@by_id(ERROR_RUNS)
def test_bad_input_is_refused_with_a_clear_error(case, launches):
    launch = launches(case.layout)
    expected = getattr(errors, case.expected)
    for rank in range(case.ranks):
        raised = launch.error_record(case, rank)["raised"]
        assert raised is not None, f"rank {rank}: nothing was raised"
        assert expected.__name__ in raised["mro"], (
            f"rank {rank}: raised {raised['module']}.{raised['type']}, expected mcore_transformers.errors."
            f"{expected.__name__}: {raised['message']}"
        )
        assert_names(raised["message"], case.words)


@by_id(ERROR_RUNS)
def test_refusal_writes_nothing(case, launches):
    launch = launches(case.layout)
    for rank in range(case.ranks):
        record = launch.error_record(case, rank)
        assert record["after"] == record["before"], f"rank {rank}: {record['watched']} changed"
        leftovers = [name for name in record["siblings"] or [] if ".tmp-" in name]
        assert not leftovers, f"rank {rank}: temporary folders left beside {record['watched']}: {leftovers}"
    if case.target in ("notes-folder", "file"):
        watched = launch.error_record(case, 0)["watched"]
        path = os.path.join(watched, "notes.txt") if case.target == "notes-folder" else watched
        with open(path) as f:
            assert f.read() == NOTES_TEXT


# ---- the checks, directly -----------------------------------------------------------------------
def test_tp_not_dividing_heads_is_refused():
    with pytest.raises(errors.LayoutError) as err:
        query_groups_for(num_heads=4, num_kv_heads=2, tp=3)
    assert_names(str(err.value), ("tp=3", "num_attention_heads=4"))


@pytest.mark.parametrize(
    "heads, kv_heads, tp, groups",
    [(4, 2, 1, 2), (4, 2, 2, 2), (4, 1, 2, 2), (8, 2, 4, 4), (4, 4, 2, 4), (8, 1, 8, 8),
     # tp neither divides the KV heads nor is a multiple of them: each KV head repeated to lcm(kv, tp) groups
     (6, 3, 2, 6), (12, 4, 6, 12), (24, 6, 4, 12), (12, 3, 4, 12)],
)
def test_query_groups_split_or_repeat_kv_heads(heads, kv_heads, tp, groups):
    assert query_groups_for(heads, kv_heads, tp) == groups


@pytest.mark.parametrize("pp, vpp, product", [(3, None, "3"), (2, 4, "8")])
def test_pp_not_dividing_layers_is_refused(pp, vpp, product):
    arch = get_architecture(tiny_config("llama"))  # 4 layers
    with pytest.raises(errors.LayoutError) as err:
        check_model_fits(arch, ParallelConfig(pp=pp, vpp=vpp))
    assert_names(str(err.value), ("num_hidden_layers=4", product))


@pytest.mark.parametrize("layout, world", [(dict(tp=2, pp=2), 2), (dict(tp=3), 4), (dict(pp=2), 1)])
def test_model_parallel_size_not_dividing_world_is_refused(layout, world):
    with pytest.raises(errors.LayoutError) as err:
        ParallelConfig(**layout).check_world(world)
    size = ParallelConfig(**layout).model_parallel_size
    assert_names(str(err.value), (f"= {size}", f"world size {world}", "nproc_per_node"))


@pytest.mark.parametrize(
    "layout, words",
    [
        (dict(tp=0), ("tp=0", "positive")),
        (dict(pp=1, vpp=2), ("vpp=2", "pp")),
        (dict(tp=1, sequence_parallel=True), ("sequence_parallel", "tp")),
    ],
)
def test_impossible_parallel_sizes_are_refused(layout, words):
    with pytest.raises(ValueError) as err:
        ParallelConfig(**layout)
    assert_names(str(err.value), words)


def test_unsupported_model_type_is_refused():
    from transformers import GPT2Config

    with pytest.raises(errors.UnsupportedModelError) as err:
        get_architecture(GPT2Config())
    assert_names(str(err.value), ("gpt2", "supported", "llama"))


@pytest.mark.parametrize("switch", ["resid_pdrop", "embd_pdrop"])
def test_unimplemented_family_switch_is_refused_by_name(switch):
    with pytest.raises(errors.UnsupportedModelError) as err:
        get_architecture(tiny_config("phi3", **{switch: 0.1})).transformer_config()
    assert_names(str(err.value), (f"{switch}=0.1", "0.0"))


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2", "olmo3"])
def test_clamped_qkv_is_refused_by_name(model_type):
    with pytest.raises(errors.UnsupportedModelError, match="clip_qkv=8.0"):
        get_architecture(tiny_config(model_type, clip_qkv=8.0)).transformer_config()
    assert get_architecture(tiny_config(model_type)).transformer_config()["qk_layernorm"]


def test_rotary_settings_per_layer_type_give_one_table_per_setting():
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 500000.0}}
    arch = get_architecture(tiny_config("olmo3", rope_parameters=rope))
    tables, table_of_layer = arch.rotary_tables()
    assert len(tables) == 2 and not tables[0].allclose(tables[1])
    assert table_of_layer == [int(kind == "full_attention") for kind in arch.hf.layer_types]
    tables, table_of_layer = get_architecture(tiny_config("olmo3")).rotary_tables()
    assert len(tables) == 1 and tables[0].shape == (8,) and table_of_layer is None  # the same settings: one table


def test_rotary_attention_factors_that_differ_per_layer_type_are_refused():
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "rope_theta": 10000.0}}
    with pytest.raises(errors.UnsupportedModelError, match="attention factors differ between layer types"):
        get_architecture(tiny_config("gemma3_text", rope_parameters=rope)).transformer_config()


@pytest.mark.parametrize("model_type,switch,words", [
    ("gemma3_text", {"use_bidirectional_attention": True}, ("use_bidirectional_attention=True", "causal")),
    ("gemma2", {"hidden_activation": "gelu"}, ("'gelu'", "hidden_activation", "gelu_pytorch_tanh")),
])
def test_unimplemented_gemma_switch_is_refused_by_name(model_type, switch, words):
    with pytest.raises(errors.UnsupportedModelError) as err:
        get_architecture(tiny_config(model_type, **switch)).transformer_config()
    assert_names(str(err.value), words)


def test_longrope_switches_to_its_long_factors_past_the_original_length():
    arch = get_architecture(tiny_config("phi3"))  # original_max_position_embeddings = 8
    length, long = arch.long_rope()
    assert length == 8 and not long.allclose(arch.rope())
    assert get_architecture(tiny_config("llama")).long_rope() is None


@pytest.mark.parametrize("switch,words", [
    # transformers ignores these two; DeepSeek's reference code honours them: the checkpoint's intent is unclear
    ({"norm_topk_prob": True}, ("norm_topk_prob=True", "ignores", "renormalises")),
    ({"moe_layer_freq": 2}, ("moe_layer_freq=2", "ignores")),
    ({"scoring_func": "sigmoid"}, ("scoring_func='sigmoid'", "softmax")),
    ({"topk_method": "noaux_tc"}, ("topk_method='noaux_tc'", "'greedy'", "'group_limited_greedy'")),
])
def test_deepseek_v2_routing_switches_without_an_exact_mapping_are_refused(switch, words):
    with pytest.raises(errors.UnsupportedModelError) as err:
        get_architecture(tiny_config("deepseek_v2", **switch)).transformer_config()
    assert_names(str(err.value), words)


def test_deepseek_v2_group_routing_ranks_groups_by_their_best_score():
    """group_limited_greedy: megatron's group limit with the best-score ranking; greedy: no group limit."""
    arch = get_architecture(tiny_config("deepseek_v2"))
    config = arch.transformer_config()
    assert (config["moe_router_num_groups"], config["moe_router_group_topk"]) == (4, 2)
    assert arch.expert_groups_ranked_by_best_score() and config["moe_router_pre_softmax"]
    greedy = get_architecture(tiny_config("deepseek_v2", topk_method="greedy")).transformer_config()
    assert "moe_router_group_topk" not in greedy


@pytest.mark.parametrize("model_type,switch,words", [
    ("glm4_moe_lite", {"partial_rotary_factor": 0.5}, ("partial_rotary_factor=0.5", "MLA")),
    ("glm4_moe", {"norm_topk_prob": False}, ("norm_topk_prob=False", "renormalises")),
    ("glm4_moe", {"num_experts_per_tok": 6}, ("num_experts_per_tok=6", "topk_group=2", "top 2")),
])
def test_unimplemented_glm4_moe_switch_is_refused_by_name(model_type, switch, words):
    with pytest.raises(errors.UnsupportedModelError) as err:
        get_architecture(tiny_config(model_type, **switch)).transformer_config()
    assert_names(str(err.value), words)


@pytest.mark.parametrize("model_type,switch,words", [
    ("ernie4_5_moe", {"use_bias": True}, ("use_bias=True", "routed experts have no biases")),
    ("minimax_m2", {"router_jitter_noise": 0.01}, ("router_jitter_noise=0.01", "Set it to 0")),
    ("granitemoe", {"attention_bias": True}, ("attention_bias=True", "o_proj")),
])
def test_unimplemented_moe_breadth_switch_is_refused_by_name(model_type, switch, words):
    with pytest.raises(errors.UnsupportedModelError) as err:
        get_architecture(tiny_config(model_type, **switch)).transformer_config()
    assert_names(str(err.value), words)


# Different mscales make PhiMoE's rotary factor depend on each forward's length (the published config's are equal).
PHIMOE_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "short_mscale": 1.1,
                   "long_mscale": 1.2, "original_max_position_embeddings": 8, "rope_theta": 10000.0}


@pytest.mark.parametrize("switch,words", [
    ({"rope_scaling": PHIMOE_LONGROPE}, ("short_mscale=1.1", "long_mscale=1.2")),
    ({"num_experts_per_tok": 1}, ("num_experts_per_tok=1", "SparseMixer", "2 experts")),
])
def test_unimplemented_phimoe_switch_is_refused_by_name(switch, words):
    with pytest.raises(errors.UnsupportedModelError) as err:
        get_architecture(tiny_config("phimoe", **switch)).transformer_config()
    assert_names(str(err.value), words)


def test_phimoe_routes_exactly_in_eval_and_refuses_training(tmp_path):
    """SparseMixer's evaluation path is exact (tests/test_moe.py); training samples experts, which is refused when the
    router runs, not at load (the published config has router and input jitter, harmless in eval)."""
    import torch

    from mcore_transformers import MCoreModelForCausalLM, destroy_parallel_state
    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    source = make_tiny_checkpoint(str(tmp_path / "phimoe"), "phimoe", num_hidden_layers=2)
    ids = torch.arange(1, 9).view(1, 8)
    try:
        model = MCoreModelForCausalLM.from_pretrained(source)
        with torch.no_grad():
            model(input_ids=ids)
        model.train()
        with pytest.raises(NotImplementedError) as err:
            model(input_ids=ids, labels=ids)
    finally:
        destroy_parallel_state()
    assert_names(str(err.value), ("SparseMixer", "training", "model.eval()"))


def test_phimoe_lm_head_bias_refuses_resizing_the_vocabulary(tmp_path):
    from mcore_transformers import MCoreModelForCausalLM, destroy_parallel_state
    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    source = make_tiny_checkpoint(str(tmp_path / "phimoe"), "phimoe", num_hidden_layers=1)
    try:
        model = MCoreModelForCausalLM.from_pretrained(source)
        with pytest.raises(errors.UnsupportedModelError) as err:
            model.resize_token_embeddings(260)
    finally:
        destroy_parallel_state()
    assert_names(str(err.value), ("resize_token_embeddings", "lm_head_bias=True"))


def test_ernie4_5_moe_layers_and_routing_follow_the_config():
    """MoE on moe_layer_start_index..moe_layer_end_index every moe_layer_interval-th layer; softmax routing with the
    selection bias kept by our router (megatron's config refuses an expert bias with softmax)."""
    arch = get_architecture(tiny_config("ernie4_5_moe"))
    config = arch.transformer_config()
    assert config["moe_layer_freq"] == [0, 1, 1, 0] and not config.get("moe_router_enable_expert_bias")
    assert arch.softmax_routing_selection_bias_floor() == 1e-12
    every_second = get_architecture(tiny_config("ernie4_5_moe", moe_layer_interval=2, moe_layer_end_index=-1))
    assert every_second.transformer_config()["moe_layer_freq"] == [0, 1, 0, 1]


def test_missing_shard_is_named(checkpoint_root):
    folder = os.path.join(checkpoint_root, "damaged", "missing-shard")
    with pytest.raises(errors.CheckpointError) as err:
        CheckpointReader(folder)
    assert_names(str(err.value), ("model-00002-of-", "missing", "download"))


@pytest.mark.parametrize("kind", ["truncated", "truncated-sharded"])
def test_truncated_file_is_named(checkpoint_root, kind):
    with pytest.raises(errors.CheckpointError) as err:
        CheckpointReader(os.path.join(checkpoint_root, "damaged", kind))
    assert_names(str(err.value), (".safetensors", "truncated", "download"))


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(errors.CheckpointError) as err:
        CheckpointReader(str(tmp_path))
    assert_names(str(err.value), ("model.safetensors", "no safetensors"))


def test_missing_path_is_refused():
    with pytest.raises(errors.CheckpointError) as err:
        resolve_checkpoint("/nonexistent/mcore-tiny-model")
    assert_names(str(err.value), ("/nonexistent/mcore-tiny-model", "does not exist"))


def test_save_onto_a_file_is_refused(tmp_path):
    target = tmp_path / "target"
    target.write_text(NOTES_TEXT)
    with pytest.raises(errors.SaveTargetError) as err:
        check_save_target(str(target))
    assert_names(str(err.value), ("is a file",))


def test_save_writes_like_transformers_into_any_folder(tmp_path):
    """As transformers' save_pretrained: parents are made; a folder's other files stay, a previous save's weights
    go; temporary folders that a killed save left beside the target are removed by the next save."""
    from mcore_transformers import MCoreModelForCausalLM, destroy_parallel_state
    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    source = str(tmp_path / "source")
    make_tiny_checkpoint(source, "llama", max_shard_size="100KB")
    target = tmp_path / "run" / "output"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text(NOTES_TEXT)
    (target / "model-00009-of-00009.safetensors").write_text("stale")
    left_behind = tmp_path / "run" / ".output.tmp-999999999-deadbeef"  # no process has that PID
    left_behind.mkdir()
    try:
        model = MCoreModelForCausalLM.from_pretrained(source)
        model.save_pretrained(str(target))
        model.save_pretrained(str(tmp_path / "new" / "nested" / "folder"))
    finally:
        destroy_parallel_state()
    assert (target / "notes.txt").read_text() == NOTES_TEXT
    assert not (target / "model-00009-of-00009.safetensors").exists() and not left_behind.exists()
    assert (target / "config.json").exists() and (tmp_path / "new" / "nested" / "folder" / "config.json").exists()
    assert sorted(os.listdir(tmp_path / "run")) == ["output"]
