"""Worker for tests/test_trainer.py: `python dist_trainer_worker.py LAUNCH CKPT_ROOT OUT` (world of one) or
the same under `torchrun --nproc_per_node=N`. It trains every run of the launch with MCoreTrainer (or plain
transformers.Trainer) and records what rank 0 saw:

  OUT/<run>/record.json   per-step losses, grad norms, learning rates, eval/predict losses, errors raised
  OUT/<run>/predict.pt    predict() logits (runs that call it)
  OUT/<run>/final/        trainer.save_model(): the HF folder of the trained model
  OUT/<run>/train/        the run's output_dir (checkpoint-N folders)

It judges nothing: the pytest side compares the records with transformers' Trainer, the oracle. The data
and training arguments live here (`make_dataset`, `training_arguments`) so both sides use the same ones.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback

import torch
import torch.distributed as dist

STEPS = 4
GLOBAL_BATCH = 4  # rows per micro-step over all data-parallel replicas
ACCUMULATION = 2
TRAIN_ROWS = 16
EVAL_ROWS = 8
SEQ = 24

# checkpoint name -> make_tiny_checkpoint overrides
CHECKPOINTS = {
    "llama": ("llama", {}),
    # tied embeddings across pipeline stages; 251 rows do not split over tp=2 (mcore pads to 252); pad id 0, a
    # token the data also uses: transformers' padding_idx row gets no gradient from lookups (the tied head's only)
    "qwen2-tied-v251": ("qwen2", {"vocab_size": 251, "tie_word_embeddings": True, "pad_token_id": 0}),
    # 3 KV heads at tp=2: 6 query groups, each HF KV head held twice (once on each rank for head 1); the
    # copies must train as one head (training/kv_copies.py)
    "llama-kv3": ("llama", {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 48}),
    "phi3": ("phi3", {}),  # packed qkv / gate_up rows, longrope
    "smollm3": ("smollm3", {}),  # rotary skipped on every second layer, tied embeddings
    "ernie4_5": ("ernie4_5", {}),  # interleaved rotary, biases on every linear
    "glm4": ("glm4", {}),  # post-sublayer norms (sequence-parallel: their gradients summed over tp)
    # tied and scaled embeddings, (1 + w) norms before and after each sublayer, one rotary table per layer type
    "gemma3_text": ("gemma3_text", {}),
}

# launch -> world size and its runs: (name, checkpoint, from_pretrained kwargs, dp, extra); extra: plain
# (transformers.Trainer), args (TrainingArguments overrides), trainer (MCoreTrainer arguments), resume,
# predict, errors, tolerance
LAUNCHES: dict[str, dict] = {
    "single": dict(world=1, runs=[
        ("plain-trainer", "llama", {}, 1, {"plain": True}),
        ("tp1", "llama", {}, 1, {"errors": True}),
        # megatron mixed precision: the fp32 model is cast to bf16, the optimizer steps fp32 masters
        ("tp1-bf16", "llama", {}, 1, {"args": {"bf16": True}, "resume": True, "tolerance": 2e-2}),
    ]),
    "tp2": dict(world=2, runs=[
        ("tp2", "llama", dict(tp=2), 1, {"resume": True}),
        ("tp2sp-tied", "qwen2-tied-v251", dict(tp=2, sequence_parallel=True), 1, {}),
        # transformers' torch AdamW on megatron's grad buffers instead of megatron-core's optimizer
        ("tp2-torch-optimizer", "llama", dict(tp=2), 1, {"trainer": {"megatron_optimizer": False}}),
        ("tp2-kv3", "llama-kv3", dict(tp=2), 1, {}),
        ("tp2-phi3", "phi3", dict(tp=2), 1, {}),
        ("tp2-ernie4_5", "ernie4_5", dict(tp=2), 1, {}),
        ("tp2sp-glm4", "glm4", dict(tp=2, sequence_parallel=True), 1, {}),
        ("tp2sp-gemma3_text", "gemma3_text", dict(tp=2, sequence_parallel=True), 1, {}),
        ("tp2-kv3-torch-optimizer", "llama-kv3", dict(tp=2), 1, {"trainer": {"megatron_optimizer": False}}),
        # load_best_model_at_end: the eval loss is lowest at step 2 (5.5277 vs 5.5311 at step 4), so
        # checkpoint-2's weights come back
        ("tp2-best", "llama", dict(tp=2), 1, {"args": {
            "load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 2,
            "metric_for_best_model": "eval_loss"}}),
    ]),
    "dp2": dict(world=2, runs=[
        ("dp2", "llama", {}, 2, {"predict": True}),
        # megatron's distributed optimizer: AdamW state and updates split over the two replicas
        ("dp2-distopt", "llama", {}, 2, {"trainer": {"distributed_optimizer": True}, "resume": True}),
    ]),
    "pp2": dict(world=2, runs=[
        ("pp2", "llama", dict(pp=2), 1, {"predict": True}),
        ("pp2-tied", "qwen2-tied-v251", dict(pp=2), 1, {}),
        ("pp2-recompute", "llama", dict(pp=2), 1, {"args": {"gradient_checkpointing": True}}),
        ("pp2vpp2", "llama", dict(pp=2, vpp=2), 1, {}),
        ("pp2-smollm3", "smollm3", dict(pp=2), 1, {}),
    ]),
    "tp2dp2": dict(world=4, runs=[
        ("tp2dp2", "llama", dict(tp=2), 2, {}),
        ("tp2dp2-distopt-kv3", "llama-kv3", dict(tp=2), 2, {"trainer": {"distributed_optimizer": True}}),
    ]),
}


def make_dataset(vocab_size: int, rows: int, seed: int) -> list[dict]:
    """Causal-LM rows with masked prompts (-100) and right padding (attention_mask 0, labels -100)."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for row in range(rows):
        ids = torch.randint(0, vocab_size, (SEQ,), generator=generator)
        labels = ids.clone()
        mask = torch.ones(SEQ, dtype=torch.long)
        if row % 3 == 0:
            labels[: 5 + row % 4] = -100  # a prompt that does not count
        if row % 4 == 1:
            pad = 3 + row % 5
            ids[-pad:] = 0
            mask[-pad:] = 0
            labels[-pad:] = -100
        data.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return data


def training_arguments(output_dir: str, per_device_batch: int, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=per_device_batch,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS,
        learning_rate=1e-3,
        weight_decay=0.1,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        warmup_steps=1,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        train_sampling_strategy="sequential",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def history(trainer) -> dict:
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    return {
        "steps": [h["step"] for h in logs],
        "loss": [h["loss"] for h in logs],
        "grad_norm": [h["grad_norm"] for h in logs],
        "learning_rate": [h["learning_rate"] for h in logs],
    }


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(path + ".part", path)


def capture_warnings() -> list:
    """Warnings MCoreTrainer logs (transformers' logger does not propagate to the root logger)."""
    messages: list = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("mcore_transformers").addHandler(Keep(level=logging.WARNING))
    return messages


def expect_error(record: dict, name: str, action) -> None:
    try:
        action()
    except Exception as err:  # the test asserts the type and the message
        record.setdefault("errors", {})[name] = {"type": type(err).__name__, "message": str(err)}
    else:
        record.setdefault("errors", {})[name] = None


def bad_inputs(record: dict, source: str, out: str, train, model) -> None:
    from transformers import AutoModelForCausalLM

    from mcore_transformers.training import MCoreTrainer

    args = lambda **kw: training_arguments(os.path.join(out, "bad"), GLOBAL_BATCH, **kw)  # noqa: E731
    expect_error(record, "hf_model", lambda: MCoreTrainer(model=AutoModelForCausalLM.from_pretrained(source), args=args()))
    expect_error(record, "micro_batch_size", lambda: MCoreTrainer(model=model, args=args(), micro_batch_size=3))
    expect_error(record, "label_smoothing", lambda: MCoreTrainer(model=model, args=args(label_smoothing_factor=0.1)))
    expect_error(record, "no_labels", lambda: MCoreTrainer(
        model=model, args=args(max_steps=1), train_dataset=[{"input_ids": r["input_ids"]} for r in train]
    ).train())
    warnings = capture_warnings()
    MCoreTrainer(model=model, args=args(ddp_find_unused_parameters=True))
    record["ddp_warning"] = [w for w in warnings if "ddp_find_unused_parameters" in w]


def run(name: str, checkpoint: str, layout: dict, dp: int, extra: dict, root: str, out: str) -> None:
    from transformers import Trainer

    from mcore_transformers import MCoreModelForCausalLM
    from mcore_transformers.training import MCoreTrainer

    source = os.path.join(root, checkpoint)
    run_dir = os.path.join(out, name)
    model = MCoreModelForCausalLM.from_pretrained(source, **layout)
    vocab = model.config.vocab_size
    train, evaluation = make_dataset(vocab, TRAIN_ROWS, 0), make_dataset(vocab, EVAL_ROWS, 1)
    per_device = GLOBAL_BATCH // dp
    record: dict = {"checkpoint": checkpoint, "layout": layout, "dp": dp}
    trainer_class = Trainer if extra.get("plain") else MCoreTrainer
    overrides, options = extra.get("args", {}), extra.get("trainer", {})
    args = training_arguments(os.path.join(run_dir, "train"), per_device, **overrides)
    trainer = trainer_class(model=model, args=args, train_dataset=train, eval_dataset=evaluation, **options)
    trainer.train()
    record["train"] = history(trainer)
    record["best_model_checkpoint"] = trainer.state.best_model_checkpoint
    record["recompute"] = model.chunks[0].config.recompute_granularity
    record["dtype"] = str(model.dtype)
    record["eval_loss"] = trainer.evaluate()["eval_loss"]
    if extra.get("predict"):
        prediction = trainer.predict(evaluation)
        record["predict_loss"] = prediction.metrics["test_loss"]
        if rank() == 0:
            torch.save(torch.as_tensor(prediction.predictions), os.path.join(run_dir, "predict.pt"))
    trainer.save_model(os.path.join(run_dir, "final"))
    if extra.get("resume"):
        # A second trainer, on a freshly loaded model, continues from checkpoint-2.
        resumed_model = MCoreModelForCausalLM.from_pretrained(source, **layout)
        resumed = MCoreTrainer(
            model=resumed_model, args=training_arguments(os.path.join(run_dir, "resumed"), per_device, **overrides),
            train_dataset=train, eval_dataset=evaluation, **options,
        )
        resumed.train(resume_from_checkpoint=os.path.join(run_dir, "train", "checkpoint-2"))
        record["resumed"] = history(resumed)
        resumed.save_model(os.path.join(run_dir, "resumed-final"))
    if extra.get("errors"):
        bad_inputs(record, source, run_dir, train, model)
    if rank() == 0:
        write_json(os.path.join(run_dir, "record.json"), record)


def resume_elsewhere(root: str, out: str, checkpoint: str) -> None:
    """Resume, in a world of one (dp=1), a checkpoint written at dp=2 with the same global batch."""
    from mcore_transformers import MCoreModelForCausalLM
    from mcore_transformers.training import MCoreTrainer

    model = MCoreModelForCausalLM.from_pretrained(os.path.join(root, "llama"))
    train = make_dataset(model.config.vocab_size, TRAIN_ROWS, 0)
    trainer = MCoreTrainer(model=model, args=training_arguments(os.path.join(out, "train"), GLOBAL_BATCH),
                           train_dataset=train)
    trainer.train(resume_from_checkpoint=checkpoint)
    write_json(os.path.join(out, "record.json"), {"resumed": history(trainer)})


def run_launch(runs, root: str, out: str, run, sizes=("tp", "pp", "vpp")) -> None:
    """`run(name, checkpoint, layout, dp, extra, root, out)` for every run of a launch in turn, the parallel state
    rebuilt where the layout's `sizes` change (any change with sizes=None); a run that raises writes
    OUT/<name>/crash.rank<r>.json first. Ends with a barrier."""
    from mcore_transformers import destroy_parallel_state

    previous = None
    for name, checkpoint, layout, dp, extra in runs:
        current = layout if sizes is None else {k: layout.get(k) for k in sizes}
        if previous is not None and current != previous:
            destroy_parallel_state()
        previous = current
        try:
            run(name, checkpoint, layout, dp, extra, root, out)
        except Exception:
            write_json(os.path.join(out, name, f"crash.rank{rank()}.json"), {"crashed": traceback.format_exc()})
            raise
    if dist.is_initialized():
        dist.barrier()


def main() -> None:
    launch, root, out = sys.argv[1:4]
    if launch == "resume-dp1":
        resume_elsewhere(root, out, sys.argv[4])
        return

    run_launch(LAUNCHES[launch]["runs"], root, out, run)


if __name__ == "__main__":
    main()
