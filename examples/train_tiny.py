"""Train a small Llama-style model from scratch with MCoreTrainer, on 2 CPU processes at tp=2.

    python examples/train_tiny.py                      # prepares, then starts 2 ranks itself
    python examples/train_tiny.py --steps 50 --out /tmp/tiny

The text is the King James Version of Genesis and Exodus (public domain: the translation is from
1611), extracted from Debian's `bible-kjv-text` package into examples/data/kjv_genesis_exodus.txt.

1. tokenizer   a byte-level BPE (1,024 tokens) trained on the text with the `tokenizers` library
2. model       a random Llama (4 layers, hidden 192, 6 heads / 2 KV heads) written by transformers
3. train       MCoreModelForCausalLM.from_pretrained(init, tp=2) + MCoreTrainer on 128-token blocks
4. save        trainer.save_model: an HF folder; then stored in bfloat16 with the tokenizer in --out
               (default: mcore_transformers/assets/demo-model, which `mcore-transformers demo` prefers)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "examples" / "data" / "kjv_genesis_exodus.txt"
DEFAULT_OUT = ROOT / "mcore_transformers" / "assets" / "demo-model"
SPECIAL = "<|endoftext|>"
MODEL = dict(
    vocab_size=1024, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_theta=10000.0,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the trained model + tokenizer go")
    parser.add_argument("--work", default=None, help="scratch folder (default: <out>.work, removed at the end)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--block", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare(work: Path) -> None:
    """Tokenizer and the random initial checkpoint (one process, before the ranks start)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    init = work / "init"
    init.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL["vocab_size"], special_tokens=[SPECIAL], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train([str(TEXT)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL)
    fast.save_pretrained(init)

    config = AutoConfig.for_model(
        "llama", **MODEL, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(init)


def blocks(work: Path, block: int) -> list[dict]:
    """The text as consecutive `block`-token training rows (labels = inputs; the model shifts)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "init")
    ids = tokenizer(TEXT.read_text())["input_ids"]
    rows = []
    for start in range(0, len(ids) - block, block):
        chunk = torch.tensor(ids[start : start + block])
        rows.append({"input_ids": chunk, "labels": chunk.clone()})
    return rows


def train(args, work: Path) -> None:
    import torch.distributed as dist
    from transformers import AutoTokenizer, TrainingArguments, default_data_collator

    from mcore_transformers import MCoreModelForCausalLM
    from mcore_transformers.training import MCoreTrainer

    model = MCoreModelForCausalLM.from_pretrained(work / "init", tp=args.tp)
    dp = dist.get_world_size() // args.tp
    data = blocks(work, args.block)
    training_args = TrainingArguments(
        output_dir=str(work / "run"),
        per_device_train_batch_size=args.batch // dp,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=max(1, args.steps // 20),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = MCoreTrainer(
        model=model, args=training_args, train_dataset=data, data_collator=default_data_collator,
        processing_class=AutoTokenizer.from_pretrained(work / "init"),
    )
    start = time.time()
    trainer.train()
    if dist.get_rank() == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
        print(f"trained {args.steps} steps in {time.time() - start:.0f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    trainer.save_model(str(work / "final"))


def finish(args, work: Path) -> None:
    """Store the trained model in bfloat16 (a few MB) with its tokenizer, and show a sample."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(work / "final", dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(work / "final")
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    prompt = tokenizer("In the beginning", return_tensors="pt")
    sample = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    print(f"saved to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")
    print("sample:", tokenizer.decode(sample[0], skip_special_tokens=True))


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.work or f"{args.out}.work")
    if args.worker:
        train(args, work)
        return
    start = time.time()
    if work.exists():
        shutil.rmtree(work)
    prepare(work)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", __file__, "--worker",
               *(argv if argv is not None else sys.argv[1:])]
    if "--work" not in command:
        command += ["--work", str(work)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    subprocess.run(command, check=True, env=env)
    finish(args, work)
    shutil.rmtree(work)
    print(f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
