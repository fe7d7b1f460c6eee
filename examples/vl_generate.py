"""Image-text-to-text generation on a tiny random Qwen3-VL, offline, checked against transformers.

    python examples/vl_generate.py
    torchrun --nproc_per_node=2 examples/vl_generate.py --tp 2
    torchrun --nproc_per_node=2 examples/vl_generate.py --pp 2

The script writes (once) a tiny Qwen3-VL checkpoint with transformers, then feeds the model what Qwen3-VL's
processor returns for a prompt with an image: `input_ids` with one placeholder token per merged patch between
vision start / end tokens, `pixel_values` ([patches, channels · temporal patch · patch²]), `image_grid_thw` and
`mm_token_type_ids`. (A real model: `processor = AutoProcessor.from_pretrained(id)`, then
`inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")`.)
The model is random, so the tokens are random; the point is the API, and that they equal what transformers'
own model generates from the same folder (checked at the end, on rank 0).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

FOLDER = os.environ.get("VL_EXAMPLE_FOLDER", os.path.join(tempfile.gettempdir(), "mcore-tiny-qwen3-vl"))
IMAGE, VIDEO, START, END = 300, 301, 302, 303


def build_tiny_model(folder: str) -> None:
    from transformers import AutoModelForImageTextToText, Qwen3VLConfig

    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
            temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.08)
    model.save_pretrained(folder)


def image_prompt() -> dict:
    """A prompt with one 8×8-patch image (16 merged patches), as Qwen3-VL's processor lays it out."""
    grid = torch.tensor([[1, 8, 8]])  # temporal, height, width in patches; 2×2 patches merge into one token
    tokens = int(grid.prod()) // 4
    input_ids = torch.tensor([[5, 6, START] + [IMAGE] * tokens + [END, 7, 8, 9]])
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == IMAGE).int(),
        "pixel_values": torch.randn(int(grid.prod()), 3 * 2 * 4 * 4, generator=generator),
        "image_grid_thw": grid,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    from mcore_transformers import MCoreModelForImageTextToText
    from mcore_transformers.runtime.parallel import is_rank0

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and not os.path.exists(os.path.join(FOLDER, "config.json")):
        build_tiny_model(FOLDER)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the others wait for rank 0's folder
        import torch.distributed as dist

        dist.init_process_group("gloo")
        dist.barrier()

    model = MCoreModelForImageTextToText.from_pretrained(FOLDER, tp=args.tp, pp=args.pp, dtype=torch.float32)
    inputs = image_prompt()
    with torch.no_grad():
        logits = model(**inputs).logits
    ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    if is_rank0():
        new = ids[0, inputs["input_ids"].shape[1]:].tolist()
        print(f"logits {list(logits.shape)}; generated {new}")
        from transformers import AutoModelForImageTextToText

        reference = AutoModelForImageTextToText.from_pretrained(FOLDER, dtype=torch.float32).eval()
        expected = reference.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        same = torch.equal(ids, expected)
        print(f"transformers generates the same tokens: {same}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
