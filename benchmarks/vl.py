"""Vision-language speed: MCoreModelForImageTextToText vs transformers' AutoModelForImageTextToText (CPU, tp=1).

    python benchmarks/vl.py                 # a ~60M Qwen3-VL-shaped model (tower ~9M), 2 prompts with 2 images
    python benchmarks/vl.py --small         # the tests' tiny model: a quick sanity run
    python benchmarks/vl.py --family qwen2_5_vl

Alternating the two implementations `--repeats` times (CPU noise hits both), it times
- forward: one forward (no cache) over a left-padded batch of two prompts holding two images of different sizes;
- generate: greedy decoding of `--new-tokens` tokens from the same batch (vision tower, prefill, then decode).
It prints medians, the spread (min–max) and the mcore/HF ratio of the medians (< 1: mcore is faster), wall clock
and process CPU time (the steadier figure on a shared machine). Logits and tokens are checked equal first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

ROOT = os.environ.get("MCORE_BENCH_DIR", "/tmp/mcore_bench_vl")
IMAGE, VIDEO, START, END, PAD = 300, 301, 302, 303, 0


def make_config(family: str, small: bool):
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    text = dict(
        vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, pad_token_id=PAD,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
    )
    vision = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512, patch_size=8,
                  temporal_patch_size=2, spatial_merge_size=2)
    if small:
        text.update(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        vision.update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4)
    tokens = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    if family == "qwen2_5_vl":
        vision.update(window_size=4 * vision["patch_size"], fullatt_block_indexes=[vision["depth"] - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)
    vision.update(num_position_embeddings=64, deepstack_visual_indexes=list(range(min(3, vision["depth"]))))
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)


def make_checkpoint(family: str, small: bool) -> str:
    from transformers import AutoModelForImageTextToText

    folder = os.path.join(ROOT, f"{family}-{'small' if small else 'medium'}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(make_config(family, small), dtype=torch.float32)
    model.save_pretrained(folder)
    print(f"wrote {folder}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    return folder


def two_image_batch(config) -> dict:
    vision = config.vision_config
    merge, patch = vision.spatial_merge_size, 3 * vision.temporal_patch_size * vision.patch_size**2
    grids = [(1, 16, 16), (1, 8, 12)]
    generator = torch.Generator().manual_seed(1)
    rows = []
    for index, grid in enumerate(grids):
        tokens = grid[0] * grid[1] * grid[2] // merge**2
        rows.append([5 + index] * (4 + 8 * index) + [START] + [IMAGE] * tokens + [END] + [7, 8, 9])
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[PAD] * (length - len(row)) + row for row in rows])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows]),
        "mm_token_type_ids": (input_ids == IMAGE).int(),
        "pixel_values": torch.randn(sum(t * h * w for t, h, w in grids), patch, generator=generator),
        "image_grid_thw": torch.tensor(grids),
    }


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(name: str, ours: list, theirs: list) -> str:
    parts = []
    for label, index in (("wall", 0), ("cpu", 1)):
        a, b = [t[index] for t in ours], [t[index] for t in theirs]
        parts.append(
            f"{label} mcore {statistics.median(a) * 1e3:7.1f} ms [{min(a) * 1e3:.1f}–{max(a) * 1e3:.1f}]  "
            f"HF {statistics.median(b) * 1e3:7.1f} ms [{min(b) * 1e3:.1f}–{max(b) * 1e3:.1f}]  "
            f"ratio {statistics.median(a) / statistics.median(b):.2f}"
        )
    return f"{name:9s} " + "\n          ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen3_vl", choices=["qwen3_vl", "qwen2_5_vl"])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from transformers import AutoModelForImageTextToText

    from mcore_transformers import MCoreModelForImageTextToText

    folder = make_checkpoint(args.family, args.small)
    hf = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    ours = MCoreModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    batch = two_image_batch(hf.config)
    generation = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        real = batch["attention_mask"].bool()
        difference = (ours(**batch).logits - hf(**batch).logits)[real].abs().max().item()
    same = torch.equal(ours.generate(**batch, **generation), hf.generate(**batch, **generation))
    print(f"{args.family}, {sum(t * h * w for t, h, w in batch['image_grid_thw'].tolist())} patches, "
          f"{batch['input_ids'].shape[1]} tokens per row; max |Δ logit| {difference:.2e}; same tokens: {same}")

    def forward(model):
        with torch.no_grad():
            model(**batch)

    results: dict = {"forward": ([], []), "generate": ([], [])}
    for _ in range(args.repeats):
        for index, model in enumerate((ours, hf)):
            results["forward"][index].append(timed(lambda: forward(model)))
            results["generate"][index].append(timed(lambda: model.generate(**batch, **generation)))
    for name, (mine, theirs) in results.items():
        print(summary(name, mine, theirs))


if __name__ == "__main__":
    main()
