"""Supervised fine-tuning with TRL's SFTTrainer, written for transformers (TRL's documented usage). To run it on
megatron-core change only the imports (tests/test_drop_in.py does exactly that):

    from mcore_transformers import MCoreModelForCausalLM as AutoModelForCausalLM
    from mcore_transformers.trl import SFTTrainer      # at tp = pp = 1 TRL's own SFTTrainer works as well

    python examples/drop_in/sft.py MODEL OUT_DIR [prompt-completion|packed-text]
    MCORE_TRANSFORMERS_TP=2 torchrun --nproc_per_node=2 examples/drop_in/sft.py ...   # with the swapped imports
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from transformers import AutoModelForCausalLM
from trl import SFTConfig
from trl import SFTTrainer

VERSES = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And the Spirit of God moved upon the face of the waters.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
    "And God called the light Day, and the darkness he called Night.",
    "And the evening and the morning were the first day.",
    "And God said, Let there be a firmament in the midst of the waters.",
]


def dataset(kind: str) -> Dataset:
    if kind == "prompt-completion":  # completion-only loss: the prompt's tokens do not count
        pairs = [(verse.split(",")[0] + ",", verse[len(verse.split(",")[0]) + 1 :]) for verse in VERSES * 2]
        return Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
    return Dataset.from_dict({"text": VERSES * 2})


def main():
    model_path, output_dir, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3, logging_steps=1,
        report_to=[], disable_tqdm=True, save_strategy="no", seed=0, use_cpu=True, max_length=48,
        train_sampling_strategy="sequential", bf16=False, packing=kind == "packed-text",
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset(kind), processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        with open(os.path.join(output_dir, "losses.json"), "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    main()
