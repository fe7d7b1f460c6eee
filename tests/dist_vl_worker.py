"""Worker for tests/test_multimodal.py: vision-language models at every layout, under torchrun (2 ranks).

    torchrun --nproc_per_node=2 tests/dist_vl_worker.py ROOT OUT

ROOT holds the tiny checkpoints (tests/vl_cases.py). For each (layout, checkpoint) of RUNS the model's logits
and loss on the image, video and text batches and its greedy generate on the image batch go to
OUT/<layout>/<checkpoint>.pt (rank 0; rank 1's logits too, as `logits_rank1`), and the model is saved to
OUT/<layout>/<checkpoint>/. Between layouts the parallel state is torn down. A run that raises records its
traceback in OUT/<layout>/<checkpoint>.crash and the others go on.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vl_cases as V  # noqa: E402

MODELS = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# layout name: (from_pretrained keywords, checkpoints)
RUNS = {
    "tp1": ({}, MODELS + ("qwen2_5_vl-nested", "qwen3_vl_moe-hub")),
    "tp2-sp": ({"tp": 2, "sequence_parallel": True}, MODELS),
    "pp2": ({"pp": 2}, MODELS),
    "ep2": ({"ep": 2}, ("qwen3_vl_moe",)),
}
NEW_TOKENS = 5
LORA_LAYOUTS = ("tp1", "tp2-sp")  # HF peft adapters (language model and vision tower), loaded with stock peft


def family_of(name: str) -> str:
    return name.split("-")[0]


def run(layout: str, name: str, root: str, out: str) -> None:
    from mcore_transformers import MCoreModelForImageTextToText

    keywords, _ = RUNS[layout]
    model = MCoreModelForImageTextToText.from_pretrained(os.path.join(root, name), dtype=torch.float32, **keywords)
    record: dict = {"logits": {}, "loss": {}}
    rank = dist.get_rank()
    for batch_name, batch in V.batches(family_of(name)).items():
        with torch.no_grad():
            output = model(**batch, labels=V.labels_for(batch))
        record["logits"][batch_name] = output.logits
        record["loss"][batch_name] = output.loss
    record["generated"] = model.generate(**V.image_batch(), max_new_tokens=NEW_TOKENS, do_sample=False)
    model.save_pretrained(os.path.join(out, layout, name))
    adapter = os.path.join(root, f"{name}-adapter")
    if layout in LORA_LAYOUTS and os.path.isdir(adapter):
        from peft import PeftModel

        import mcore_transformers.peft as mpeft

        peft_model = PeftModel.from_pretrained(model, adapter)
        with torch.no_grad():
            record["lora_logits"] = peft_model(**V.image_batch()).logits
        mpeft.save_adapter(peft_model, os.path.join(out, layout, f"{name}-adapter"))
    if rank == 0:
        torch.save(record, os.path.join(out, layout, f"{name}.pt"))
    elif rank == 1:
        torch.save(record["logits"], os.path.join(out, layout, f"{name}.rank1.pt"))


TRAIN = {"tp2-sp": "qwen3_vl", "pp2": "qwen3_vl"}  # layout: checkpoint fine-tuned with MCoreTrainer
TRAIN_LORA = {"tp2-sp": "qwen2_5_vl"}  # layout: checkpoint whose HF adapter (tower included) MCoreTrainer trains


def train(layout: str, name: str, root: str, out: str, lora: bool = False) -> None:
    """Three MCoreTrainer steps on image-text pairs (pp2: two micro-batches, each with its own rows' images), of
    the whole model or (lora) of the checkpoint's HF adapter."""
    import json

    from mcore_transformers import MCoreModelForImageTextToText
    from mcore_transformers.training import MCoreTrainer

    keywords, _ = RUNS[layout]
    model = MCoreModelForImageTextToText.from_pretrained(os.path.join(root, name), dtype=torch.float32, **keywords)
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.path.join(root, f"{name}-adapter"), is_trainable=True)
    options = {"micro_batch_size": 1} if keywords.get("pp", 1) > 1 else {}
    trainer = MCoreTrainer(
        model=model, args=V.training_arguments(os.path.join(out, layout, "train")), train_dataset=V.training_rows(),
        data_collator=V.collate, **options,
    )
    trainer.train()
    if dist.get_rank() == 0:
        with open(os.path.join(out, layout, f"{name}{'.lora' if lora else ''}.train.json"), "w") as f:
            json.dump(V.loss_history(trainer), f)


def main() -> None:
    root, out = sys.argv[1], sys.argv[2]
    from mcore_transformers.runtime import destroy_parallel_state

    for layout, (_, names) in RUNS.items():
        os.makedirs(os.path.join(out, layout), exist_ok=True)
        for name in names:
            try:
                run(layout, name, root, out)
            except Exception:
                with open(os.path.join(out, layout, f"{name}.crash{dist.get_rank() if dist.is_initialized() else 0}"), "w") as f:
                    f.write(traceback.format_exc())
            destroy_parallel_state()
        for kind, table in (("train", TRAIN), ("train-lora", TRAIN_LORA)):
            if layout in table:
                try:
                    train(layout, table[layout], root, out, lora=kind == "train-lora")
                except Exception:
                    rank = dist.get_rank() if dist.is_initialized() else 0
                    with open(os.path.join(out, layout, f"{kind}.crash{rank}"), "w") as f:
                        f.write(traceback.format_exc())
                destroy_parallel_state()


if __name__ == "__main__":
    main()
