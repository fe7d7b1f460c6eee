"""MCoreTrainer on mixture-of-experts models and with fp16, against transformers' Trainer (the oracle).

MoE: per-step losses, grad norms and the eval loss equal transformers' with `output_router_logits` off
(cross-entropy only) and on (cross-entropy + router_aux_loss_coef × transformers' load-balancing loss), in
one process, at ep=2 (experts split, two data-parallel replicas), at tp=2 with sequence parallelism
(each rank routes half of the sequence), and pooled where no single forward sees the whole batch on every
layer: pp=2, pp=2 × vpp=2, several micro-batches per device batch. The aux coefficient is raised to 0.05 so the aux term is ~3.5% of
the logged loss; the tolerance (1e-4, the runs agree to ~1e-7) also catches an aux loss computed over
one replica's or one TP rank's tokens instead of the whole batch's. The model's own forward returns
transformers' `loss`, `aux_loss` and router logits.

fp16: the model computes in float16 with fp32 master weights and dynamic loss scaling; its losses stay
within fp16 precision of transformers' (which, on the CPU, trains in fp32). An inf gradient on one rank
makes every rank skip that step together (weights kept, scale halved on both ranks).

Worker: tests/dist_trainer_moe_worker.py, one launch per world size.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_trainer_moe_worker as M  # noqa: E402
import dist_trainer_worker as W  # noqa: E402
import launching  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_trainer_moe_worker.py")
LAUNCH_TIMEOUT_S = 300
RTOL = 1e-4  # fp32: the runs agree to ~1e-7 (the trainer suite allows 2e-3)

RUNS = {name: (launch, checkpoint, layout, dp, extra)
        for launch, spec in M.LAUNCHES.items() for name, checkpoint, layout, dp, extra in spec["runs"]}


@pytest.fixture(scope="module")
def moe_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("trainer-moe-checkpoints"))
    M.build_checkpoints(root)
    return root


@pytest.fixture(scope="module")
def launch(moe_root, tmp_path_factory):
    """`launch(name)` runs the worker for that launch once; returns (output folder, log)."""
    return launching.once_per_key(WORKER, moe_root, tmp_path_factory, "trainer-moe",
                                  lambda name: M.LAUNCHES[name]["world"], LAUNCH_TIMEOUT_S)


def read(launch, run: str, name: str = "record.json") -> dict:
    out, log = launch(RUNS[run][0])
    return launching.worker_record(out, run, log, name)


@pytest.fixture(scope="module")
def oracle(moe_root, tmp_path_factory):
    """transformers' Trainer on AutoModelForCausalLM, the global batch on one device (cached per case)."""
    from transformers import AutoModelForCausalLM, Trainer

    cache: dict = {}

    def get(checkpoint: str, aux: bool) -> dict:
        if (checkpoint, aux) not in cache:
            model = AutoModelForCausalLM.from_pretrained(os.path.join(moe_root, checkpoint))
            model.config.output_router_logits = aux
            vocab = model.config.vocab_size
            args = W.training_arguments(str(tmp_path_factory.mktemp("oracle-moe")), W.GLOBAL_BATCH, save_strategy="no")
            trainer = Trainer(model=model, args=args, train_dataset=W.make_dataset(vocab, W.TRAIN_ROWS, 0),
                              eval_dataset=W.make_dataset(vocab, W.EVAL_ROWS, 1))
            trainer.train()
            cache[(checkpoint, aux)] = {"train": W.history(trainer), "eval_loss": trainer.evaluate()["eval_loss"]}
        return cache[(checkpoint, aux)]

    return get


PARITY_RUNS = [name for name, spec in RUNS.items() if "inject_inf" not in spec[4]]


@pytest.mark.parametrize("run", PARITY_RUNS)
def test_per_step_losses_match_transformers(launch, oracle, run):
    record = read(launch, run)
    expected = oracle(record["checkpoint"], record["aux"])
    rtol = RUNS[run][4].get("tolerance", RTOL)
    assert record["train"]["steps"] == expected["train"]["steps"]
    torch.testing.assert_close(record["train"]["loss"], expected["train"]["loss"], rtol=rtol, atol=0)
    torch.testing.assert_close(record["train"]["grad_norm"], expected["train"]["grad_norm"], rtol=rtol, atol=0)
    torch.testing.assert_close(record["train"]["learning_rate"], expected["train"]["learning_rate"], rtol=1e-6, atol=0)
    assert record["eval_loss"] == pytest.approx(expected["eval_loss"], rel=rtol)


def test_aux_loss_is_in_the_logged_loss(launch, oracle):
    """The aux runs log cross-entropy + coef × aux: clearly apart from the cross-entropy-only numbers."""
    with_aux, without = oracle("qwen3_moe", True)["train"]["loss"], oracle("qwen3_moe", False)["train"]["loss"]
    assert all(a - b > 0.02 * b for a, b in zip(with_aux, without))
    assert read(launch, "aux")["train"]["loss"] != read(launch, "ce")["train"]["loss"]


def test_forward_returns_transformers_loss_and_aux_loss(moe_root):
    """MCoreModelForCausalLM's forward with output_router_logits: HF's loss (CE + coef·aux), aux_loss, router logits."""
    from transformers import AutoModelForCausalLM

    from mcore_transformers import MCoreModelForCausalLM

    folder = os.path.join(moe_root, "qwen2_moe")
    theirs_model = AutoModelForCausalLM.from_pretrained(folder)
    ours_model = MCoreModelForCausalLM.from_pretrained(folder)
    rows = W.make_dataset(theirs_model.config.vocab_size, 3, 5)
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}
    theirs = theirs_model(**batch, output_router_logits=True)
    ours = ours_model(**batch, output_router_logits=True)
    assert ours.aux_loss.item() == pytest.approx(theirs.aux_loss.item(), rel=1e-5)
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), rel=1e-5)
    assert len(ours.router_logits) == len(theirs.router_logits) == 3  # qwen2_moe: 4 layers, one dense
    for a, b in zip(ours.router_logits, theirs.router_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    torch.testing.assert_close(ours_model.chunks[0].decoder.layers[0].mlp.router.weight.grad,
                               theirs_model.model.layers[0].mlp.gate.weight.grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # without output_router_logits (config default): cross-entropy only, as transformers
        assert ours_model(**batch).loss.item() == pytest.approx(theirs_model(**batch).loss.item(), rel=1e-5)
        assert getattr(ours_model(**batch), "aux_loss", None) is None


def test_fp16_is_mixed_precision_with_loss_scaling(launch):
    record = read(launch, "fp16")
    steps = read(launch, "fp16", "rank0.json")
    assert record["dtype"] == "torch.float16"
    assert steps["skipped"] == [False] * W.STEPS and steps["scale"] == [2.0**16] * W.STEPS


@pytest.mark.parametrize("run", ["tp2sp-fp16-inf", "tp2sp-fp16-inf-torch-optimizer"])
def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(launch, run):
    """Rank 1's gradient overflows at step 2: both ranks skip it (weights kept) and halve the scale."""
    record = read(launch, run)
    for rank in (0, 1):
        steps = read(launch, run, f"rank{rank}.json")
        assert steps["overflow"] == [False, True, False, False], rank
        assert steps["scale"] == [2.0**16, 2.0**15, 2.0**15, 2.0**15], rank
        weights = steps["fingerprint"]  # after steps 1..4 (step 1 has learning rate 0: warmup)
        assert weights[1] == weights[0] and weights[2] != weights[1] and weights[3] != weights[2], rank
    assert not math.isfinite(record["train"]["grad_norm"][1])
    assert all(math.isfinite(x) for x in record["train"]["loss"])
    lr = record["train"]["learning_rate"]
    # the skip reaches accelerate: the scheduler holds its step (Megatron-LM and transformers' GradScaler alike)
    assert steps["skipped"] == [False, True, False, False]
    assert lr[2] == lr[1]


def test_aux_loss_with_activation_checkpointing_is_refused(moe_root, tmp_path):
    from mcore_transformers import MCoreModelForCausalLM
    from mcore_transformers.training import MCoreTrainer, TrainingError

    model = MCoreModelForCausalLM.from_pretrained(os.path.join(moe_root, "qwen3_moe"))
    model.config.output_router_logits = True
    trainer = MCoreTrainer(model=model, args=W.training_arguments(str(tmp_path), 4, max_steps=1, save_strategy="no",
                                                                  gradient_checkpointing=True),
                           train_dataset=W.make_dataset(model.config.vocab_size, 4, 0))
    with pytest.raises(TrainingError, match="output_router_logits"):
        trainer.train()
