"""Online RL with TRL's GRPOTrainer generating through vLLM (TRL's in-process "colocate" engine), written for
transformers. To run it on megatron-core change only imports:

    from mcore_transformers import MCoreModelForCausalLM as AutoModelForCausalLM
    from mcore_transformers.trl import GRPOTrainer      # pushes the weights into vLLM through update_weights

    python examples/drop_in/grpo_vllm.py MODEL OUT_DIR
    MCORE_TRANSFORMERS_TP=2 torchrun --nproc_per_node=2 examples/drop_in/grpo_vllm.py MODEL OUT_DIR

vLLM runs in the trainer's process (on the CPU: VLLM_CPU_KVCACHE_SPACE=1 keeps its KV cache small).
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
        use_cpu=True, bf16=False, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=256,
        # The correction reweights the loss by the engine's own log-probabilities: vLLM on the CPU serves this float32
        # model in bfloat16, whose roundings make the loss differ between otherwise equal runs.
        vllm_importance_sampling_correction=False,
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
