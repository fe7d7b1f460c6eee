"""Worker for tests/test_trainer_moe.py: `python dist_trainer_moe_worker.py LAUNCH CKPT_ROOT OUT` (world of one)
or the same under `torchrun --nproc_per_node=2`. Trains every run of the launch with MCoreTrainer (or plain
transformers.Trainer) on a tiny MoE model and records what each rank saw:

  OUT/<run>/record.json         rank 0: per-step losses, grad norms, learning rates, eval loss
  OUT/<run>/rank<r>.json        every rank, per step: loss scale, overflow found, step skipped (accelerate's
                                view), a fingerprint of the weights (fp16)

The data and training arguments are tests/dist_trainer_worker.py's; the pytest side runs transformers'
Trainer on AutoModelForCausalLM with the same ones (the oracle) and compares.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_trainer_worker as W  # noqa: E402

# checkpoint name -> (model_type, make_tiny_checkpoint overrides). A large aux coefficient makes the
# load-balancing term ~10% of the logged loss, so a wrong aux loss cannot hide inside the tolerance.
CHECKPOINTS = {
    "qwen3_moe": ("qwen3_moe", {"router_aux_loss_coef": 0.05}),
    "qwen2_moe": ("qwen2_moe", {"router_aux_loss_coef": 0.05}),
    # sigmoid routing steered by a score-correction bias (kept fixed, as transformers does), group-limited choice,
    # a shared expert, a dense first layer; no aux loss in transformers
    "glm4_moe": ("glm4_moe", {}),
}

# launch -> world size and runs: (name, checkpoint, from_pretrained kwargs, dp, extra)
#   extra: aux (config.output_router_logits), args (TrainingArguments overrides), plain (transformers.Trainer),
#          inject_inf (rank that gets an inf gradient at the second optimizer step), tolerance,
#          trainer (MCoreTrainer keyword arguments)
LAUNCHES: dict[str, dict] = {
    "single": dict(world=1, runs=[
        ("ce", "qwen3_moe", {}, 1, {}),
        ("aux", "qwen3_moe", {}, 1, {"aux": True}),
        ("aux-qwen2", "qwen2_moe", {}, 1, {"aux": True}),  # shared expert, one dense layer
        ("plain-aux", "qwen3_moe", {}, 1, {"aux": True, "plain": True}),  # the model's forward: loss + coef·aux
        ("fp16", "qwen3_moe", {}, 1, {"args": {"fp16": True}, "tolerance": 1e-2}),
        # the aux loss pooled over micro-batches: a counting forward first (router_aux.PooledRouting)
        ("aux-micro-batches", "qwen3_moe", {}, 1, {"aux": True, "trainer": {"micro_batch_size": 2}}),
    ]),
    "world2": dict(world=2, runs=[  # one launch, the layouts in turn (parallel state rebuilt between them)
        ("ep2-aux", "qwen3_moe", dict(ep=2), 2, {"aux": True}),  # experts split; two data-parallel replicas
        # megatron trains MoE under tp only with sequence parallelism: each rank routes half the sequence
        ("tp2sp-aux", "qwen3_moe", dict(tp=2, sequence_parallel=True), 1, {"aux": True}),
        # the aux loss pooled over pipeline stages (and micro-batches; interleaved, a dense first layer)
        ("pp2-aux", "qwen3_moe", dict(pp=2), 1, {"aux": True}),
        ("pp2vpp2-aux-qwen2", "qwen2_moe", dict(pp=2, vpp=2), 1, {"aux": True}),
        ("ep2-glm4_moe", "glm4_moe", dict(ep=2), 2, {}),
        ("tp2sp-glm4_moe", "glm4_moe", dict(tp=2, sequence_parallel=True), 1, {}),
        # fp16: rank 1's gradient overflows at step 2; with megatron's optimizer (its loss scaler) and with
        # transformers' torch AdamW (torch's GradScaler semantics, agreed over ranks)
        ("tp2sp-fp16-inf", "qwen3_moe", dict(tp=2, sequence_parallel=True), 1,
         {"args": {"fp16": True}, "inject_inf": 1}),
        ("tp2sp-fp16-inf-torch-optimizer", "qwen3_moe", dict(tp=2, sequence_parallel=True), 1,
         {"args": {"fp16": True, "optim": "adamw_torch"}, "inject_inf": 1, "trainer": {"megatron_optimizer": False}}),
    ]),
}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def build_checkpoints(root: str) -> None:
    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    for name, (model_type, overrides) in CHECKPOINTS.items():
        make_tiny_checkpoint(os.path.join(root, name), model_type, **overrides)


def fingerprint(model) -> float:
    """A number that changes whenever this rank's weights do."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def run(name: str, checkpoint: str, layout: dict, dp: int, extra: dict, root: str, out: str) -> None:
    from transformers import Trainer, TrainerCallback

    from mcore_transformers import MCoreModelForCausalLM
    from mcore_transformers.training import MCoreTrainer

    run_dir = os.path.join(out, name)
    model = MCoreModelForCausalLM.from_pretrained(os.path.join(root, checkpoint), **layout)
    model.config.output_router_logits = bool(extra.get("aux"))
    vocab = model.config.vocab_size
    train, evaluation = W.make_dataset(vocab, W.TRAIN_ROWS, 0), W.make_dataset(vocab, W.EVAL_ROWS, 1)
    per_device = W.GLOBAL_BATCH // dp
    args = W.training_arguments(os.path.join(run_dir, "train"), per_device, save_strategy="no", **extra.get("args", {}))
    steps: dict = {"scale": [], "overflow": [], "skipped": [], "fingerprint": []}

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            optimizer, scaler = getattr(trainer, "_megatron_optimizer", None), trainer.accelerator.scaler
            if optimizer is not None:  # megatron's optimizer scales the loss itself
                steps["scale"].append(optimizer.loss_scale())
                steps["overflow"].append(optimizer.skipped)
            else:
                steps["scale"].append(scaler.get_scale() if scaler is not None else None)
                steps["overflow"].append(getattr(scaler, "found_overflow", None))
            steps["skipped"].append(bool(trainer.accelerator.optimizer_step_was_skipped))
            steps["fingerprint"].append(fingerprint(model))

    class InjectInf(MCoreTrainer):
        def _clip_grad_norm(self, model_):
            # The second optimizer step: one rank's (scaled) gradient overflows, the other's does not.
            if self.state.global_step == 1 and rank() == extra["inject_inf"]:
                with torch.no_grad():
                    if self._megatron_optimizer is not None:  # the reduced gradient buffer megatron reads
                        next(p for p in self._mcore.chunks[0].parameters() if p.requires_grad).main_grad.view(-1)[0] = float("inf")
                    else:
                        self._grads.targets[0].grad.view(-1)[0] = float("inf")
            return super()._clip_grad_norm(model_)

    trainer_class = Trainer if extra.get("plain") else InjectInf if "inject_inf" in extra else MCoreTrainer
    options = {} if extra.get("plain") else extra.get("trainer", {})
    trainer = trainer_class(model=model, args=args, train_dataset=train, eval_dataset=evaluation, callbacks=[Watch()],
                            **options)
    trainer.train()
    record = {"checkpoint": checkpoint, "aux": bool(extra.get("aux")), "train": W.history(trainer),
              "dtype": str(model.dtype), "eval_loss": trainer.evaluate()["eval_loss"]}
    W.write_json(os.path.join(run_dir, f"rank{rank()}.json"), steps)
    if rank() == 0:
        W.write_json(os.path.join(run_dir, "record.json"), record)


def main() -> None:
    launch, root, out = sys.argv[1:4]
    W.run_launch(LAUNCHES[launch]["runs"], root, out, run, sizes=None)


if __name__ == "__main__":
    main()
