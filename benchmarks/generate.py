"""Greedy decoding speed: mcore generate() vs transformers generate() on the same bf16 checkpoint (CPU, world of one).

    python benchmarks/generate.py                      # ~300M Llama-style model, batch 1 and 8, 128 new tokens
    python benchmarks/generate.py --small              # a ~7M model: a quick sanity run
    python benchmarks/generate.py --checkpoint DIR     # any local HF checkpoint

Per batch size it times, alternating the two implementations `--repeats` times (CPU noise hits both):
- prefill: one forward over the prompt with a fresh KV cache and last-token logits (what generate does first);
- generate: `max_new_tokens` greedy tokens (`min_new_tokens` too, so eos cannot stop early);
- decode tokens/s = batch · (new tokens - 1) / (generate - prefill).
Medians are printed with the mcore/HF ratios (> 1 means mcore is faster for tokens/s, slower for times).
Both wall-clock and process CPU time are measured: on a machine shared with other jobs the CPU-time
figures ("cpu") are the steadier comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

ROOT = os.environ.get("MCORE_BENCH_DIR", "/tmp/mcore_bench_generate")
LARGE = dict(  # 20 layers, hidden 1024, vocab 32000: ~300M parameters, ~0.6 GB in bf16
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
    num_key_value_heads=8, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
SMALL = dict(
    vocab_size=8000, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def make_checkpoint(small: bool) -> str:
    """A random Llama-style bf16 checkpoint written by transformers (reused when present)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = SMALL if small else LARGE
    folder = os.path.join(ROOT, "llama-small" if small else "llama-300m")
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        if all(config.get(k) == v for k, v in kwargs.items()) and any(
            name.endswith(".safetensors") for name in os.listdir(folder)
        ):
            return folder
    except OSError:
        pass
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kwargs), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    print(f"wrote {folder}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    return folder


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(models: dict, batch: int, prompt_len: int, new_tokens: int, repeats: int, vocab: int) -> dict:
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=generator)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    times = {name: {"prefill": [], "generate": [], "prefill_cpu": [], "generate_cpu": []} for name in models}
    outputs = {}
    with torch.no_grad():
        for name, model in models.items():  # warm-up (first-call allocations, lazy init)
            model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        for _ in range(repeats):
            for name, model in models.items():
                wall, cpu = _timed(lambda: model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1))
                times[name]["prefill"].append(wall)
                times[name]["prefill_cpu"].append(cpu)
                wall, cpu = _timed(lambda: outputs.__setitem__(name, model.generate(ids, **kwargs)))
                times[name]["generate"].append(wall)
                times[name]["generate_cpu"].append(cpu)
    result = {}
    for name in models:
        med = {key: statistics.median(values) for key, values in times[name].items()}
        decoded = batch * (new_tokens - 1)
        result[name] = {
            "prefill_s": med["prefill"],
            "generate_s": med["generate"],
            "decode_tokens_per_s": decoded / max(med["generate"] - med["prefill"], 1e-9),
            "end_to_end_tokens_per_s": batch * new_tokens / med["generate"],
            "prefill_cpu_s": med["prefill_cpu"],
            "decode_tokens_per_cpu_s": decoded / max(med["generate_cpu"] - med["prefill_cpu"], 1e-9),
            "all": times[name],
        }
    a, b = outputs["mcore"][:, prompt_len:], outputs["hf"][:, prompt_len:]
    result["same_tokens_fraction"] = (a == b).float().mean().item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from mcore_transformers import MCoreModelForCausalLM

    folder = args.checkpoint or make_checkpoint(args.small)
    dtype = getattr(torch, args.dtype)
    models = {
        "mcore": MCoreModelForCausalLM.from_pretrained(folder, dtype=dtype),
        "hf": AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval(),
    }
    vocab = models["hf"].config.vocab_size
    print(f"{folder}: {models['hf'].num_parameters() / 1e6:.0f}M parameters, {args.dtype}, "
          f"{torch.get_num_threads()} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    report = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        r = bench(models, batch, args.prompt_len, args.new_tokens, args.repeats, vocab)
        report[batch] = r
        m, h = r["mcore"], r["hf"]
        print(
            f"batch {batch:>2}: decode {m['decode_tokens_per_s']:7.1f} tok/s (HF {h['decode_tokens_per_s']:7.1f}, "
            f"ratio {m['decode_tokens_per_s'] / h['decode_tokens_per_s']:.2f}) | "
            f"end-to-end {m['end_to_end_tokens_per_s']:7.1f} tok/s (HF {h['end_to_end_tokens_per_s']:7.1f}) | "
            f"prefill {m['prefill_s'] * 1e3:7.1f} ms (HF {h['prefill_s'] * 1e3:7.1f}, "
            f"time ratio {m['prefill_s'] / h['prefill_s']:.2f}) | same tokens {r['same_tokens_fraction']:.2f}"
        )
        print(
            f"    cpu: decode {m['decode_tokens_per_cpu_s']:7.1f} tok/cpu-s (HF {h['decode_tokens_per_cpu_s']:7.1f}, "
            f"ratio {m['decode_tokens_per_cpu_s'] / h['decode_tokens_per_cpu_s']:.2f}) | prefill "
            f"{m['prefill_cpu_s'] * 1e3:7.1f} cpu-ms (HF {h['prefill_cpu_s'] * 1e3:7.1f}, "
            f"ratio {m['prefill_cpu_s'] / h['prefill_cpu_s']:.2f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
