"""Preference tuning with TRL's DPOTrainer, written for transformers. To run it on megatron-core change only imports:

    from mcore_transformers import MCoreModelForCausalLM as AutoModelForCausalLM   # tp = pp = 1: TRL's own trainer
    from mcore_transformers.trl import DPOTrainer                                  # any layout, under torchrun

    python examples/drop_in/dpo.py MODEL OUT_DIR [lora]
    MCORE_TRANSFORMERS_TP=2 torchrun --nproc_per_node=2 examples/drop_in/dpo.py MODEL OUT_DIR
"""

import json
import os
import sys

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer
from transformers import AutoModelForCausalLM
from trl import DPOConfig
from trl import DPOTrainer

PAIRS = [
    ("In the beginning", " God created the heaven and the earth.", " the earth was without form."),
    ("And God said,", " Let there be light: and there was light.", " darkness was upon the deep."),
    ("And God called the light", " Day, and the darkness he called Night.", " the evening and the morning."),
    ("And the Spirit of God", " moved upon the face of the waters.", " divided the light from darkness."),
]


def main():
    model_path, output_dir = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if len(sys.argv) > 3 and sys.argv[3] == "lora":  # LoRA: the reference is the model with its adapter disabled
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        model, reference = get_peft_model(model, config), None
    else:
        reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    data = Dataset.from_dict({key: [pair[i] for pair in PAIRS * 2] for i, key in enumerate(("prompt", "chosen", "rejected"))})
    args = DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3, logging_steps=1,
        report_to=[], disable_tqdm=True, save_strategy="no", seed=0, use_cpu=True, bf16=False,
        train_sampling_strategy="sequential", per_device_eval_batch_size=4,
    )
    trainer = DPOTrainer(
        model=model, ref_model=reference, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    metrics = trainer.evaluate()
    logs = [{k: v for k, v in entry.items() if k.startswith(("loss", "rewards/"))} for entry in trainer.state.log_history if "loss" in entry]
    logs.append({k: v for k, v in metrics.items() if k.startswith(("eval_loss", "eval_rewards/", "eval_logps/"))})
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, "logs.json"), "w") as f:
            json.dump(logs, f)


if __name__ == "__main__":
    main()
