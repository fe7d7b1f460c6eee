"""Worker for tests/test_trainer_reshard.py: resuming a checkpoint at another tp / pp reshards it.

  torchrun --nproc_per_node=2 dist_trainer_reshard_worker.py pairs CKPT_ROOT OUT
  python dist_trainer_reshard_worker.py single CKPT_ROOT OUT      (after `pairs`, same OUT)

`pairs` trains the reference runs (4 steps, checkpoint-2 saved) at several layouts, then resumes some
of those checkpoints at another layout in the same world; `single` resumes the tp=2 checkpoint in a
world of one and records the refusals. Records (rank 0): OUT/<run>/record.json with the per-step
history (dist_trainer_worker.history). Data, arguments and models are those of tests/test_trainer.py
(dist_trainer_worker); this worker judges nothing.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_trainer_worker as W  # noqa: E402

# reference runs: name -> (from_pretrained layout, dp, options); options: "args" (training arguments),
# "checkpoint" (tiny model, default llama), "lora" (train q/v/down_proj LoRA adapters only), "trainer"
# (MCoreTrainer arguments). By default megatron-core's optimizer trains and dist_checkpointing reshards;
# LoRA, Adafactor and "torch-" runs step transformers' torch optimizer and reshard through hf_optimizer/.
REFERENCES = {
    "tp2": (dict(tp=2), 1, {}),
    "pp2": (dict(pp=2), 1, {}),
    "tp1dp2": ({}, 2, {}),
    "tp2-bf16": (dict(tp=2), 1, {"args": {"bf16": True}}),
    "torch-tp2-bf16": (dict(tp=2), 1, {"args": {"bf16": True}, "trainer": {"megatron_optimizer": False}}),
    # megatron's distributed optimizer: state and fp32 masters split over the two data-parallel ranks
    "distopt-tp1dp2": ({}, 2, {"trainer": {"distributed_optimizer": True}}),
    # tied embeddings (the last stage's output layer is a copy) and a vocabulary tp=2 pads (251 -> 252)
    "tied-pp2": (dict(pp=2), 1, {"checkpoint": "qwen2-tied-v251", "args": {"max_steps": 2}}),
    "lora-tp2": (dict(tp=2), 1, {"lora": True}),
    # factored second moments (not shaped like the parameter): resumable at tp=2 only
    "adafactor-tp2": (dict(tp=2), 1, {"args": {"optim": "adafactor", "max_steps": 2}}),
    # routed experts over expert parallelism (per-expert HF tensors)
    "moe-ep2": (dict(ep=2), 2, {"checkpoint": "qwen3_moe", "args": {"max_steps": 2}}),
    # the same through transformers' torch optimizer, whose checkpoints reshard between ep=2 and ep=1
    "torch-moe-ep2": (dict(ep=2), 2, {"checkpoint": "qwen3_moe", "args": {"max_steps": 2},
                                       "trainer": {"megatron_optimizer": False}}),
}
# resumed runs: name -> (reference whose checkpoint-2 it resumes, layout, dp)
RESUMES = {
    "pairs": {
        "pp2-to-tp2": ("pp2", dict(tp=2), 1),
        "tp1dp2-to-tp2": ("tp1dp2", dict(tp=2), 1),
        "tp2-bf16-to-pp2": ("tp2-bf16", dict(pp=2), 1),
        "lora-tp2-to-pp2": ("lora-tp2", dict(pp=2), 1),
        "pp2-to-vpp2": ("pp2", dict(pp=2, vpp=2), 1),
        "torch-tp2-bf16-to-pp2": ("torch-tp2-bf16", dict(pp=2), 1),
        "distopt-tp1dp2-to-tp2": ("distopt-tp1dp2", dict(tp=2), 1),
    },
    "single": {
        "tp2-to-tp1": ("tp2", {}, 1),
    },
}
# round trips: name -> (reference, layout, dp): load its checkpoint-2 at `layout`, train no step, save
# the state again (OUT/<name>/train/checkpoint-2), which must equal the reference's tensor for tensor
ROUND_TRIPS = {
    "pairs": {
        "tp2-bf16-via-pp2": ("tp2-bf16", dict(pp=2), 1),
        "torch-tp2-bf16-via-pp2": ("torch-tp2-bf16", dict(pp=2), 1),
        "distopt-tp1dp2-via-tp2": ("distopt-tp1dp2", dict(tp=2), 1),
        "pp2-via-tp1dp2": ("pp2", {}, 2),
        "tied-pp2-via-tp2": ("tied-pp2", dict(tp=2), 1),
        "lora-tp2-via-pp2": ("lora-tp2", dict(pp=2), 1),
        "torch-moe-ep2-via-tp2": ("torch-moe-ep2", dict(tp=2, sequence_parallel=True), 1),  # experts over etp = tp
    },
    "single": {},
}
ORDER = {  # runs in an order that rebuilds megatron's parallel state as rarely as possible
    "pairs": ["tp2", "tp2-bf16", "torch-tp2-bf16", "lora-tp2", "adafactor-tp2", "tp1dp2", "distopt-tp1dp2",
              "pp2", "tied-pp2", "pp2-via-tp1dp2", "tp2-bf16-to-pp2", "tp2-bf16-via-pp2", "torch-tp2-bf16-to-pp2",
              "torch-tp2-bf16-via-pp2", "lora-tp2-to-pp2", "lora-tp2-via-pp2", "pp2-to-vpp2", "moe-ep2",
              "torch-moe-ep2", "tp1dp2-to-tp2", "pp2-to-tp2", "tied-pp2-via-tp2", "torch-moe-ep2-via-tp2", "distopt-tp1dp2-to-tp2",
              "distopt-tp1dp2-via-tp2"],
    "single": ["tp2-to-tp1"],
}
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def checkpoint_of(out: str, reference: str) -> str:
    return os.path.join(out, reference, "train", "checkpoint-2")


def train(name: str, root: str, out: str, layout: dict, dp: int, options: dict, resume: str = None,
          round_trip: bool = False) -> dict:
    from mcore_transformers import MCoreModelForCausalLM
    from mcore_transformers.training import MCoreTrainer

    model = MCoreModelForCausalLM.from_pretrained(os.path.join(root, options.get("checkpoint", "llama")), **layout)
    vocab = model.config.vocab_size
    if options.get("lora"):
        from peft import LoraConfig, get_peft_model

        from mcore_transformers import peft as mpeft

        mpeft.enable(model)
        model = get_peft_model(model, LoraConfig(**LORA))
    data = W.make_dataset(vocab, W.TRAIN_ROWS, 0)
    args = W.training_arguments(os.path.join(out, name, "train"), W.GLOBAL_BATCH // dp, **options.get("args", {}))
    trainer = MCoreTrainer(model=model, args=args, train_dataset=data, **options.get("trainer", {}))
    if round_trip:
        args.max_steps = 2  # resume checkpoint-2 and stop: the state is loaded at this layout, nothing trained
    trainer.train(resume_from_checkpoint=resume)
    if round_trip:
        trainer._save_checkpoint(trainer.model, None)  # the checkpoint of step 2 again, written from this layout
    return {"train": W.history(trainer), "layout": layout, "dp": dp}


def refusals(root: str, out: str) -> dict:
    """Resuming checkpoints in a world of one: with another model, another optimizer, factored optimizer state,
    or megatron's optimizer from ep=2 to ep=1."""
    from mcore_transformers import MCoreModelForCausalLM
    from mcore_transformers.training import MCoreTrainer

    checkpoint = checkpoint_of(out, "tp2")
    record: dict = {}

    def attempt(checkpoint_name: str, checkpoint: str = checkpoint, **overrides):
        model = MCoreModelForCausalLM.from_pretrained(os.path.join(root, checkpoint_name))
        data = W.make_dataset(model.config.vocab_size, W.TRAIN_ROWS, 0)
        args = W.training_arguments(os.path.join(out, "refused", "train"), W.GLOBAL_BATCH, **overrides)
        MCoreTrainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=checkpoint)

    W.expect_error(record, "other_model", lambda: attempt("qwen2-tied-v251"))
    W.expect_error(record, "other_optimizer", lambda: attempt("llama", optim="sgd"))
    W.expect_error(record, "ep_side", lambda: attempt("qwen3_moe", checkpoint_of(out, "moe-ep2"), max_steps=2))
    W.expect_error(record, "factored_state", lambda: attempt("llama", checkpoint_of(out, "adafactor-tp2"), optim="adafactor"))
    return record


def main() -> None:
    launch, root, out = sys.argv[1:4]
    from mcore_transformers import destroy_parallel_state

    previous = None
    for name in ORDER[launch]:
        if name in REFERENCES:
            layout, dp, options = REFERENCES[name]
            resume = None
        else:
            reference, layout, dp = {**RESUMES[launch], **ROUND_TRIPS[launch]}[name]
            options = REFERENCES[reference][2]
            resume = checkpoint_of(out, reference)
        sizes = {k: layout.get(k) for k in ("tp", "pp", "vpp", "ep")}
        if previous is not None and sizes != previous:
            destroy_parallel_state()
        previous = sizes
        try:
            record = train(name, root, out, layout, dp, options, resume, name in ROUND_TRIPS[launch])
        except Exception:
            W.write_json(os.path.join(out, name, f"crash.rank{W.rank()}.json"), {"crashed": traceback.format_exc()})
            raise
        if W.rank() == 0:
            W.write_json(os.path.join(out, name, "record.json"), record)
    if launch == "single":
        if previous != {"tp": None, "pp": None, "vpp": None, "ep": None}:
            destroy_parallel_state()
        W.write_json(os.path.join(out, "refusals", "record.json"), refusals(root, out))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
