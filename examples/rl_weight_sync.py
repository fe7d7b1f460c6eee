"""The shape of a GRPO-style RL loop on one machine: vLLM generates, a reward scores, megatron-core trains,
`update_weights` pushes the new weights into the running engine. On the shipped demo model, tp=2.

    .venv-vllm/bin/python examples/rl_weight_sync.py            # starts 2 ranks itself (torchrun)
    .venv-vllm/bin/python examples/rl_weight_sync.py --iterations 4

Every iteration: the engine (on rank 0) samples 4 completions per prompt; a toy reward (completions that speak of
"light", not too long) scores them; the completions above their group's mean reward (a group-relative advantage,
as in GRPO, here used to select rather than to weight the loss) become one MCoreTrainer step's data (prompt tokens
masked out of the loss); then `update_weights` syncs the engine, which keeps serving. The mean reward is printed per
iteration. A GRPO loss proper (advantage-weighted token log-probabilities with a KL term) needs those per-token
weights inside megatron's pipeline schedule; TRL's GRPOTrainer does it at tp = pp = 1 (examples/drop_in/grpo.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

PROMPTS = ["And God said", "In the beginning", "And the evening", "And God saw"]
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mcore_transformers", "assets", "demo-model")


def reward(text: str) -> float:
    return text.count("light") - 0.02 * max(0, len(text.split()) - 12)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, TrainingArguments
    from transformers.utils import logging

    logging.set_verbosity_error()
    from mcore_transformers import MCoreModelForCausalLM, MCoreTrainer
    from mcore_transformers.vllm import start_engine, update_weights

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    model = MCoreModelForCausalLM.from_pretrained(DEMO, tp=2, dtype=torch.float32)
    rank = dist.get_rank()
    llm = start_engine(DEMO, dtype="float32", enforce_eager=True, max_model_len=256, seed=0) if rank == 0 else None
    for iteration in range(args.iterations):
        samples = [None]
        if rank == 0:  # the engine samples; every rank of the model trains on the same batch
            from vllm import SamplingParams

            outs = llm.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_tokens=24, seed=iteration))
            samples = [[[(out.prompt_token_ids, list(c.token_ids), c.text) for c in out.outputs] for out in outs]]
        dist.broadcast_object_list(samples, src=0)
        rows, rewards = [], []
        for group in samples[0]:
            scores = [reward(text) for _, _, text in group]
            rewards += scores
            mean = sum(scores) / len(scores)
            for (prompt, completion, _), score in zip(group, scores):
                if score > mean:  # above the group's mean: a positive group-relative advantage
                    ids = torch.tensor(prompt + completion)
                    labels = ids.clone()
                    labels[: len(prompt)] = -100
                    rows.append({"input_ids": ids, "labels": labels})
        if rank == 0:
            print(f"iteration {iteration}: mean reward {sum(rewards) / len(rewards):.3f} over {len(rewards)} "
                  f"completions, {len(rows)} above their group's mean", flush=True)
        if rows:
            length = max(len(row["input_ids"]) for row in rows)
            for row in rows:  # right padding, out of the loss
                pad = length - len(row["input_ids"])
                row["attention_mask"] = torch.cat([torch.ones(len(row["input_ids"]), dtype=torch.long), torch.zeros(pad, dtype=torch.long)])
                row["input_ids"] = torch.cat([row["input_ids"], torch.full((pad,), tokenizer.pad_token_id)])
                row["labels"] = torch.cat([row["labels"], torch.full((pad,), -100)])
            training = TrainingArguments(
                output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(rows), max_steps=1, learning_rate=2e-3,
                report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", log_level="error",
            )
            MCoreTrainer(model=model, args=training, train_dataset=rows).train()
            model.eval()
        report = update_weights(model, llm)
        if rank == 0:
            print(f"  synced {report.bytes / 2**20:.1f} MiB in {report.seconds['total']:.2f}s "
                  f"({report.buckets} bucket(s), {report.transport})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), VLLM_CPU_KVCACHE_SPACE="1",
               TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--iterations", str(args.iterations)]
    sys.exit(subprocess.call(command, env=env))


if __name__ == "__main__":
    main()
