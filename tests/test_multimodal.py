"""Vision-language models (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE) against transformers, at every layout.

One launch of tests/dist_vl_worker.py (2 ranks) runs each checkpoint at tp=1, tp=2 with sequence
parallelism, pp=2 and (MoE) ep=2; these tests compare what it recorded with transformers' own model
(`AutoModelForImageTextToText`, fp32) on the same batches: two left-padded prompts with three images of
different sizes, a video (one block, or one block per frame for Qwen3-VL) beside a text-only row, and a
text-only batch. Logits within 1e-4 on every real token, losses within 1e-5, greedy generate with images
token-identical, and `save_pretrained` gives back every source tensor bit for bit under its source name
(Qwen2.5-VL's flat files and the nested module layout, the hub's transposed MoE experts, each kept). An HF
peft adapter on every linear (language model and vision tower) gives PeftModel's logits and saves back bit for
bit. MCoreTrainer fine-tunes on image-text pairs with the HF Trainer's per-step losses and gradient norms (tp=2
with sequence parallelism, pp=2; and the adapter alone at tp=2 with sequence parallelism). `verify` checks a VL checkpoint with a synthetic image. Bad input is refused with
the cause before any output.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_vl_worker as W  # noqa: E402
import launching  # noqa: E402
import vl_cases as V  # noqa: E402

# The model drives transformers' vision towers and a private generate hook (_prepare_position_ids_for_generation):
# the whole file is in the compatibility subset that also runs on the oldest transformers of the tested range.
pytestmark = pytest.mark.compat

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_vl_worker.py")
LAUNCH_TIMEOUT_S = 600
CASES = [(layout, name) for layout, (_, names) in W.RUNS.items() for name in names]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("vl-checkpoints"))
    V.build_checkpoints(folder)
    return folder


@pytest.fixture(scope="module")
def launched(root, tmp_path_factory) -> tuple[str, str]:
    out = str(tmp_path_factory.mktemp("vl-out"))
    _, log = launching.launch(WORKER, [root, out], 2, LAUNCH_TIMEOUT_S, os.path.join(out, "worker.log"))
    return out, log


_REFERENCES: dict = {}


def reference(root: str, name: str) -> dict:
    """transformers' logits, losses and greedy tokens for checkpoint `name` (computed once)."""
    if name not in _REFERENCES:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(os.path.join(root, name), dtype=torch.float32).eval()
        record: dict = {"logits": {}, "loss": {}}
        for batch_name, batch in V.batches(W.family_of(name)).items():
            with torch.no_grad():
                output = model(**batch, labels=V.labels_for(batch))
            record["logits"][batch_name], record["loss"][batch_name] = output.logits, output.loss
        record["generated"] = model.generate(**V.image_batch(), max_new_tokens=W.NEW_TOKENS, do_sample=False)
        _REFERENCES[name] = record
    return _REFERENCES[name]


def fail_on_crash(out: str, layout: str, stem: str) -> None:
    """Fail with the worker's traceback when the run `stem` of `layout` raised on a rank."""
    for rank in (0, 1):
        crash = os.path.join(out, layout, f"{stem}.crash{rank}")
        if os.path.exists(crash):
            with open(crash) as f:
                pytest.fail(f"{layout}/{stem} raised on rank {rank}:\n{f.read()}")


def result(launched, layout: str, name: str) -> dict:
    out, log = launched
    fail_on_crash(out, layout, name)
    path = os.path.join(out, layout, f"{name}.pt")
    if not os.path.exists(path):
        pytest.fail(f"{layout}/{name}: no record. Worker log:\n{log[-6000:]}")
    return torch.load(path, weights_only=False)


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, file)))
    return tensors


@pytest.mark.parametrize("layout,name", CASES)
@pytest.mark.parametrize("batch", ["image", "video", "text"])
def test_logits_and_loss_match_transformers(launched, root, layout, name, batch):
    ours, ref = result(launched, layout, name), reference(root, name)
    real = V.batches(W.family_of(name))[batch]["attention_mask"].bool()
    difference = (ours["logits"][batch] - ref["logits"][batch])[real].abs().max().item()
    assert difference <= 1e-4, f"{layout}/{name}/{batch}: logits differ from transformers' by {difference:.3g}"
    assert abs(ours["loss"][batch].item() - ref["loss"][batch].item()) <= 1e-5
    rank1 = torch.load(os.path.join(launched[0], layout, f"{name}.rank1.pt"), weights_only=False)
    assert torch.equal(rank1[batch], ours["logits"][batch]), "the ranks returned different logits"


@pytest.mark.parametrize("layout,name", CASES)
def test_greedy_generate_with_images_matches_transformers(launched, root, layout, name):
    ours, ref = result(launched, layout, name), reference(root, name)
    assert torch.equal(ours["generated"], ref["generated"]), (ours["generated"], ref["generated"])


@pytest.mark.parametrize("layout,name", CASES)
def test_save_pretrained_gives_back_the_source_bit_for_bit(launched, root, layout, name):
    result(launched, layout, name)
    saved, source = _tensors(os.path.join(launched[0], layout, name)), _tensors(os.path.join(root, name))
    assert sorted(saved) == sorted(source)
    different = [key for key in source if not torch.equal(saved[key], source[key])]
    assert not different, f"{layout}/{name}: {different[:5]} differ from the source"
    for extra in ("preprocessor_config.json", "chat_template.jinja"):  # copied from the source folder
        with open(os.path.join(root, name, extra)) as a, open(os.path.join(launched[0], layout, name, extra)) as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("layout", W.LORA_LAYOUTS)
@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_an_hf_lora_adapter_gives_peft_logits(launched, root, layout, name):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    ours = result(launched, layout, name)["lora_logits"]
    base = AutoModelForImageTextToText.from_pretrained(os.path.join(root, name), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(root, f"{name}-adapter")).eval()
    batch = V.image_batch()
    with torch.no_grad():
        ref = model(**batch).logits
    without = reference(root, name)["logits"]["image"]
    real = batch["attention_mask"].bool()
    assert (ref - without)[real].abs().max() > 1e-2, "the adapter must change the logits for this test to mean anything"
    assert (ours - ref)[real].abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", W.LORA_LAYOUTS)
@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_the_adapter_saves_back_bit_for_bit_under_hf_names(launched, root, layout, name):
    """The loaded adapter (vision tower and language model, all-linear) written back by save_adapter: the same keys
    (`base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight`, ...) and bytes as peft's own file."""
    from safetensors.torch import load_file

    result(launched, layout, name)
    source, saved = (os.path.join(folder, "adapter_model.safetensors")
                     for folder in (os.path.join(root, f"{name}-adapter"), os.path.join(launched[0], layout, f"{name}-adapter")))
    source, saved = load_file(source), load_file(saved)
    assert any(".visual." in key for key in source), "the adapter must adapt the tower for this test to mean anything"
    assert sorted(saved) == sorted(source)
    assert all(torch.equal(saved[key], source[key]) for key in source)


_HF_TRAINING: dict = {}


@pytest.mark.parametrize("layout,lora", [(layout, False) for layout in sorted(W.TRAIN)]
                         + [(layout, True) for layout in sorted(W.TRAIN_LORA)])
def test_mcore_trainer_on_image_text_pairs_matches_the_hf_trainer(launched, root, layout, lora, tmp_path):
    """Per-step losses and gradient norms of three steps (the tower trains too: under sequence parallelism its
    gradient is summed over the TP ranks' stream slices; at pp=2 each micro-batch carries its own rows' images).
    With lora, the checkpoint's adapter trains (its tower layers included) and the base stays frozen."""
    import json

    out, _ = launched
    fail_on_crash(out, layout, "train-lora" if lora else "train")
    name = (W.TRAIN_LORA if lora else W.TRAIN)[layout]
    with open(os.path.join(out, layout, f"{name}{'.lora' if lora else ''}.train.json")) as f:
        ours = json.load(f)
    if (name, lora) not in _HF_TRAINING:
        from transformers import AutoModelForImageTextToText, Trainer

        model = AutoModelForImageTextToText.from_pretrained(os.path.join(root, name), dtype=torch.float32)
        if lora:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, os.path.join(root, f"{name}-adapter"), is_trainable=True)
        trainer = Trainer(model=model, args=V.training_arguments(str(tmp_path / "hf")), train_dataset=V.training_rows(),
                          data_collator=V.collate)
        trainer.train()
        _HF_TRAINING[name, lora] = V.loss_history(trainer)
    ref = _HF_TRAINING[name, lora]
    assert len(ours["loss"]) == len(ref["loss"]) == 3
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)


def test_the_saved_folder_loads_in_transformers_with_the_same_logits(launched, root):
    from transformers import AutoModelForImageTextToText

    folder = os.path.join(launched[0], "tp2-sp", "qwen3_vl")
    assert os.path.exists(os.path.join(folder, "config.json"))
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    batch = V.image_batch()
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.equal(logits, reference(root, "qwen3_vl")["logits"]["image"])


# ---- bad input, in this process at tp = 1 -------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen3_vl(root):
    from mcore_transformers import MCoreModelForImageTextToText

    model = MCoreModelForImageTextToText.from_pretrained(os.path.join(root, "qwen3_vl"), dtype=torch.float32)
    yield model
    from mcore_transformers import destroy_parallel_state

    destroy_parallel_state()


def test_placeholders_that_do_not_match_the_features_are_refused(qwen3_vl):
    batch = V.image_batch()
    batch["image_grid_thw"] = batch["image_grid_thw"].clone()
    batch["image_grid_thw"][0, 1] = 8  # the grid now describes more patches than the prompt has placeholders
    with pytest.raises(ValueError, match="placeholder token.*image_grid_thw describes"):
        qwen3_vl(**batch)


def test_pixels_without_their_grid_are_refused(qwen3_vl):
    batch = V.image_batch()
    del batch["image_grid_thw"]
    with pytest.raises(ValueError, match="pixel_values came without image_grid_thw"):
        qwen3_vl(**batch)


def test_a_video_written_as_one_block_for_qwen3_vl_is_refused(qwen3_vl):
    batch = V.video_batch("qwen2_5_vl")  # one block for two frames: Qwen3-VL's processor writes one per frame
    with pytest.raises(ValueError, match="each video frame as its own block"):
        qwen3_vl(**batch)


def test_unsupported_families_and_layouts_are_refused(root, qwen3_vl):
    from mcore_transformers import MCoreModelForCausalLM, MCoreModelForImageTextToText
    from mcore_transformers.errors import LayoutError, UnsupportedModelError
    from mcore_transformers.multimodal.image_text import MCoreModelForImageTextToText as Cls

    with pytest.raises(UnsupportedModelError, match="vision-language model: load it with MCoreModelForImageTextToText"):
        MCoreModelForCausalLM.from_pretrained(os.path.join(root, "qwen3_vl"))
    with pytest.raises(UnsupportedModelError, match="not a supported vision-language model. Supported: qwen2_5_vl"):
        from mcore_transformers.tools.tiny import make_tiny_checkpoint

        MCoreModelForImageTextToText.from_pretrained(make_tiny_checkpoint(os.path.join(root, "llama-text"), "llama"))
    # four layers over pp·vpp = 4 chunks leave one on the first stage; Qwen3-VL's deepstack feeds the first two
    arch = Cls._architecture(qwen3_vl.config, os.path.join(root, "qwen3_vl"), None)
    from mcore_transformers.runtime.parallel import ParallelConfig

    with pytest.raises(LayoutError, match="deepstack features go into the first 2"):
        Cls._build(arch, ParallelConfig(pp=2, vpp=2), torch.float32)


def test_verify_checks_a_vision_language_checkpoint_with_a_synthetic_image(root, qwen3_vl):
    from mcore_transformers import verify

    report = verify(os.path.join(root, "qwen3_vl"), model=qwen3_vl)
    assert report.passed and report.model_type == "qwen3_vl" and report.max_abs_logit_diff <= 1e-4


def test_the_example_generates_what_transformers_generates_at_tp2(tmp_path):
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "vl_generate.py")
    env = launching.worker_env(VL_EXAMPLE_FOLDER=str(tmp_path / "tiny-qwen3-vl"))
    code, log = launching.launch(example, ["--tp", "2"], 2, LAUNCH_TIMEOUT_S, str(tmp_path / "example.log"), env=env)
    assert code == 0 and "transformers generates the same tokens: True" in log, log[-4000:]


def test_lora_names_shared_with_megatron_reach_only_the_tower(root, qwen3_vl):
    """Qwen3-VL's vision MLP is `linear_fc1` / `linear_fc2`, like megatron's own MLP linears: those names adapt the
    tower (HF's modules), never megatron's; a megatron-only name is refused with the fix."""
    from peft import LoraConfig, get_peft_model

    from mcore_transformers.errors import AdapterError

    peft_model = get_peft_model(qwen3_vl, LoraConfig(r=2, target_modules=["qkv", "linear_fc1"]))
    adapted = sorted({name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if ".lora_A." in name})
    try:
        assert adapted and all(name.startswith("base_model.model.model.visual.") for name in adapted), adapted
        assert any(name.endswith("blocks.0.mlp.linear_fc1") for name in adapted)
        assert any(name.endswith("merger.linear_fc1") for name in adapted)
    finally:
        peft_model.unload()
    with pytest.raises(AdapterError, match=r"megatron-core's linear names.*hf_target_modules"):
        get_peft_model(qwen3_vl, LoraConfig(r=2, target_modules=["linear_qkv"]))
