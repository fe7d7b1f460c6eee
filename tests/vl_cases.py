"""Tiny vision-language checkpoints written by transformers, and the batches the multimodal tests feed them.

Inputs are built directly as transformers' processors return them (torchvision, which the fast processors need,
does not import beside the CPU torch here): `pixel_values` `[patches, channels · temporal_patch · patch²]`, one
grid `(t, h, w)` per image or video, and one placeholder token per merged patch between vision start / end.
"""

from __future__ import annotations

import os

import torch

VOCAB = 320
IMAGE, VIDEO, START, END, PAD = 300, 301, 302, 303, 0
PATCH, TEMPORAL, MERGE, CHANNELS = 4, 2, 2, 3
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def _text_config(**extra) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
        pad_token_id=PAD, **extra,
    )


def make_config(family: str):
    tokens = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=PATCH,
        temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE, in_channels=CHANNELS,
    )
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text = _text_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        vision.update(window_size=16, fullatt_block_indexes=[1], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        vision.update(num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        if family == "qwen3_vl":
            text = _text_config(rope_parameters=rope)
            return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)
        text = _text_config(
            rope_parameters=rope, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
            decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        )
        return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)
    raise ValueError(family)


def make_checkpoint(family: str, folder: str, seed: int = 0) -> str:
    """A random tiny model of `family` saved by transformers (fp32) in `folder`."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(make_config(family), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init's, so that differences show in the logits
        for param in model.parameters():
            param.normal_(0.0, 0.08)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    # what a hub folder carries beside the weights (the processor's settings, the chat template)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        f.write('{"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 4, "merge_size": 2}\n')
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write("{% for message in messages %}{{ message['content'] }}{% endfor %}\n")
    return folder


def _pixels(grids: list[tuple[int, int, int]], generator: torch.Generator) -> torch.Tensor:
    patches = sum(t * h * w for t, h, w in grids)
    return torch.randn(patches, CHANNELS * TEMPORAL * PATCH * PATCH, generator=generator)


def _placeholders(grid: tuple[int, int, int], token: int) -> list[int]:
    t, h, w = grid
    return [START] + [token] * (t * h * w // MERGE**2) + [END]


def image_batch(seed: int = 1) -> dict:
    """Two prompts, left-padded: the first with two images of different sizes, the second with one."""
    generator = torch.Generator().manual_seed(seed)
    grids = [(1, 4, 4), (1, 2, 6), (1, 4, 2)]
    rows = [
        [5, 6] + _placeholders(grids[0], IMAGE) + [7, 8, 9] + _placeholders(grids[1], IMAGE) + [10, 11],
        [12] + _placeholders(grids[2], IMAGE) + [13, 14, 15],
    ]
    return _batch(rows, generator, images=grids)


def video_batch(family: str, seed: int = 2) -> dict:
    """One prompt with a two-frame video (and one with text only, padded). Qwen3-VL's processor writes each
    frame as its own block after a timestamp; Qwen2.5-VL's the whole video as one."""
    generator = torch.Generator().manual_seed(seed)
    grid = (2, 4, 4)
    if family != "qwen2_5_vl":
        frame = (1, 4, 4)
        video = [40] + _placeholders(frame, VIDEO) + [41] + _placeholders(frame, VIDEO)
    else:
        video = _placeholders(grid, VIDEO)
    rows = [[20, 21] + video + [22, 23], [24, 25, 26, 27]]
    batch = _batch(rows, generator, videos=[grid])
    batch["second_per_grid_ts"] = torch.tensor([1.0])
    return batch


def text_batch() -> dict:
    rows = [[30, 31, 32, 33, 34, 35], [36, 37, 38]]
    return _batch(rows, torch.Generator().manual_seed(3))


def _batch(rows, generator, images=(), videos=()) -> dict:
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[PAD] * (length - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == IMAGE] = 1
    types[input_ids == VIDEO] = 2
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": types}
    if images:
        batch["pixel_values"] = _pixels(list(images), generator)
        batch["image_grid_thw"] = torch.tensor(images)
    if videos:
        batch["pixel_values_videos"] = _pixels(list(videos), generator)
        batch["video_grid_thw"] = torch.tensor(videos)
    return batch


def labels_for(batch: dict) -> torch.Tensor:
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[(labels == IMAGE) | (labels == VIDEO)] = -100
    return labels


def batches(family: str) -> dict[str, dict]:
    return {"image": image_batch(), "video": video_batch(family), "text": text_batch()}


def _rewrite(source: str, target: str, change) -> str:
    """A copy of the checkpoint in `source` whose tensors `change(name, tensor)` renames / reshapes."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = load_file(os.path.join(source, "model.safetensors"))
    save_file(dict(change(name, tensor) for name, tensor in tensors.items()),
              os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    return target


def make_nested_variant(source: str, target: str) -> str:
    """Qwen2.5-VL under transformers 5's module names (`model.language_model.*`, `model.visual.*`); its own files
    (and transformers 5's saves of it) keep the flat `model.*` / `visual.*` layout. transformers reads both."""
    def rename(name, tensor):
        if name.startswith("visual."):
            return "model." + name, tensor
        if name.startswith("model."):
            return "model.language_model." + name[len("model."):], tensor
        return name, tensor

    return _rewrite(source, target, rename)


def make_hub_moe_variant(source: str, target: str) -> str:
    """Qwen3-VL-MoE experts as the hub's files store them: transposed ([E, hidden, 2·I], [E, I, hidden])."""
    def transpose(name, tensor):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensor = tensor.transpose(1, 2).contiguous()
        return name, tensor

    return _rewrite(source, target, transpose)


LORA_TARGETS = "all-linear"  # the language model's projections and every linear of the vision tower


def make_adapter(source: str, target: str, seed: int = 5) -> str:
    """An HF peft LoRA adapter (non-zero B) on every linear but the LM head (vision tower included), saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    base = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(target)
    return target


def build_checkpoints(root: str) -> None:
    for family in FAMILIES:
        make_checkpoint(family, os.path.join(root, family))
    make_nested_variant(os.path.join(root, "qwen2_5_vl"), os.path.join(root, "qwen2_5_vl-nested"))
    make_hub_moe_variant(os.path.join(root, "qwen3_vl_moe"), os.path.join(root, "qwen3_vl_moe-hub"))
    for family in ("qwen2_5_vl", "qwen3_vl"):
        make_adapter(os.path.join(root, family), os.path.join(root, f"{family}-adapter"))


def training_rows(count: int = 6, seed: int = 7) -> list[dict]:
    """Image-text examples for fine-tuning: a prompt with one image (sizes vary), the answer's tokens in labels."""
    generator = torch.Generator().manual_seed(seed)
    grids = [(1, 4, 4), (1, 2, 6), (1, 4, 2), (1, 2, 2)]
    rows = []
    for index in range(count):
        grid = grids[index % len(grids)]
        prompt = [int(t) for t in torch.randint(4, 290, (2 + index % 3,), generator=generator)]
        answer = [int(t) for t in torch.randint(4, 290, (5,), generator=generator)]
        ids = prompt + _placeholders(grid, IMAGE) + answer
        labels = [-100] * (len(ids) - len(answer)) + answer
        rows.append({
            "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "pixel_values": _pixels([grid], generator), "image_grid_thw": torch.tensor([grid]),
        })
    return rows


def collate(rows: list[dict]) -> dict:
    """Right-padded ids / labels / mask, the token kinds, and every row's pixels and grids concatenated in order."""
    length = max(len(row["input_ids"]) for row in rows)
    pad = lambda t, value: torch.nn.functional.pad(t, (0, length - len(t)), value=value)  # noqa: E731
    input_ids = torch.stack([pad(row["input_ids"], PAD) for row in rows])
    return {
        "input_ids": input_ids,
        "labels": torch.stack([pad(row["labels"], -100) for row in rows]),
        "attention_mask": torch.stack([pad(torch.ones(len(row["input_ids"]), dtype=torch.long), 0) for row in rows]),
        "mm_token_type_ids": (input_ids == IMAGE).int(),
        "pixel_values": torch.cat([row["pixel_values"] for row in rows]),
        "image_grid_thw": torch.cat([row["image_grid_thw"] for row in rows]),
    }


def training_arguments(output_dir: str, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=output_dir, per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3, weight_decay=0.1,
        max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=1, logging_steps=1, save_strategy="no",
        train_sampling_strategy="sequential", report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
        remove_unused_columns=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def loss_history(trainer) -> dict:
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    return {"loss": [h["loss"] for h in logs], "grad_norm": [h["grad_norm"] for h in logs]}
