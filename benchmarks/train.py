"""Training throughput: MCoreTrainer (tp=1, one process) against transformers' Trainer, same model and data.

    python benchmarks/train.py                     # defaults: a 4-layer Llama, 8 x 256 tokens per step
    python benchmarks/train.py --steps 20 --hidden 512 --json out.json

Both trainers run the same optimizer steps on the same batches (AdamW, fp32, no accumulation); the
figure is tokens per second over the timed steps (after `--warmup` untimed ones). The two trainers take
turns `--rounds` times on fresh models, the one going first alternating (a shared machine drifts by
±10 % over a minute, and a run after another in the same process is slower); prints each trainer's
median over the rounds, every round's ratio, and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments


class StepTimer(TrainerCallback):
    def __init__(self, warmup: int):
        self.warmup, self.times, self._start = warmup, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def make_checkpoint(folder: str, args) -> str:
    config = AutoConfig.for_model(
        "llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=max(512, args.seq),
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def run(trainer_class, model, args, data, out: str) -> dict:
    timer = StepTimer(args.warmup)
    training_args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
        learning_rate=1e-4, logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=True, train_sampling_strategy="sequential", seed=0,
    )
    trainer_class(model=model, args=training_args, train_dataset=data, callbacks=[timer]).train()
    times = sorted(timer.times)
    median = times[len(times) // 2]
    tokens = args.batch * args.seq
    return {"tokens_per_s": tokens / median, "best_tokens_per_s": tokens / times[0], "step_s": median,
            "steps": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each trainer")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from mcore_transformers import MCoreModelForCausalLM
    from mcore_transformers.training import MCoreTrainer

    generator = torch.Generator().manual_seed(0)
    rows = args.batch * (args.warmup + args.steps)
    data = [{"input_ids": (ids := torch.randint(0, args.vocab, (args.seq,), generator=generator)), "labels": ids.clone()}
            for _ in range(rows)]
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = make_checkpoint(os.path.join(scratch, "model"), args)
        trainers = {
            "transformers.Trainer": lambda out: run(Trainer, AutoModelForCausalLM.from_pretrained(folder), args, data, out),
            "MCoreTrainer (tp=1)": lambda out: run(MCoreTrainer, MCoreModelForCausalLM.from_pretrained(folder), args, data,
                                                   out),
        }
        for index in range(args.rounds):
            order = list(trainers) if index % 2 == 0 else list(reversed(trainers))  # who goes first alternates
            rounds.append({name: trainers[name](os.path.join(scratch, f"{index}-{len(name)}")) for name in order})
    results = {}
    for name in rounds[0]:
        speeds = sorted(r[name]["tokens_per_s"] for r in rounds)
        results[name] = {"tokens_per_s": statistics.median(speeds), "per_round": [r[name] for r in rounds]}
        print(f"{name:<22} {results[name]['tokens_per_s']:>9.0f} tokens/s  (median of {args.rounds} rounds; "
              f"{', '.join(f'{s:.0f}' for s in speeds)}; {args.steps} steps of {args.batch} x {args.seq} tokens each)")
    ratios = [r["MCoreTrainer (tp=1)"]["tokens_per_s"] / r["transformers.Trainer"]["tokens_per_s"] for r in rounds]
    ratio = statistics.median(ratios)
    print(f"MCoreTrainer / Trainer per round: {', '.join(f'{x:.2f}x' for x in ratios)}")
    print(f"MCoreTrainer / Trainer: {ratio:.2f}x median   (torch threads: {torch.get_num_threads()})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results, "ratio": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
