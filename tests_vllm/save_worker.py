"""python save_worker.py SOURCE TARGET LAYOUT DTYPE ADAPTERS (under torchrun for tp2 / ep2): load SOURCE with
mcore_transformers in LAYOUT and save it to TARGET. LAYOUT "merge": attach a LoRA adapter (random, non-zero), save it
under ADAPTERS/llama, then merge_and_unload and save the merged model."""

import os
import sys

import torch

LAYOUTS = {"tp1": {}, "tp2": {"tp": 2}, "ep2": {"ep": 2}, "merge": {}}


def main() -> None:
    source, target, layout, dtype, adapters = sys.argv[1:6]
    from mcore_transformers import MCoreModelForCausalLM

    model = MCoreModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **LAYOUTS[layout])
    if layout == "merge":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(os.path.join(adapters, "llama"))
        model = peft_model.merge_and_unload()
    model.save_pretrained(target)


if __name__ == "__main__":
    main()
