"""Online RL with TRL's GRPOTrainer (generation through the model's own `generate`), written for transformers. To run
it on megatron-core change only imports:

    from mcore_transformers import MCoreModelForCausalLM as AutoModelForCausalLM   # tp = pp = 1: TRL's own trainer
    from mcore_transformers.trl import GRPOTrainer                                 # any layout, under torchrun

    python examples/drop_in/grpo.py MODEL OUT_DIR
    MCORE_TRANSFORMERS_TP=2 torchrun --nproc_per_node=2 examples/drop_in/grpo.py MODEL OUT_DIR
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from transformers import AutoModelForCausalLM
from trl import GRPOConfig
from trl import GRPOTrainer

PROMPTS = ["In the beginning", "And God said", "And the earth", "And the evening"]


def reward_light(completions, **kwargs):
    """A toy reward: completions that speak of light."""
    return [float(completion.count("light")) + 0.05 * len(completion.split()) for completion in completions]


def main():
    model_path, output_dir = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=output_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=12, max_steps=3,
        learning_rate=1e-3, beta=0.1, logging_steps=1, report_to=[], disable_tqdm=True, save_strategy="no", seed=0,
        use_cpu=True, bf16=False,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_light, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 3}),
        processing_class=tokenizer,
    )
    trainer.train()
    keys = ("loss", "reward", "kl", "completions/mean_length", "grad_norm")
    logs = [{k: entry[k] for k in keys if k in entry} for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, "logs.json"), "w") as f:
            json.dump(logs, f)


if __name__ == "__main__":
    main()
