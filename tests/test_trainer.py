"""MCoreTrainer trains like transformers' Trainer: same per-step losses, grad norms and learning rates at
tp=2, dp=2 (per-device batch halved), pp=2 (and vpp, sequence parallelism, tied embeddings), the saved HF
folder predicts like the HF-trained model, checkpoints resume bit for bit, bad input is refused.

One worker launch per world layout (tests/dist_trainer_worker.py, results as JSON); the oracle is
transformers' Trainer on AutoModelForCausalLM in this process, with the same data and arguments and the
whole global batch on one device.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_trainer_worker as W  # noqa: E402

# MCoreTrainer overrides transformers.Trainer's hooks, which move between releases (the checkpointing switch was
# renamed in 5.24, save_model called _save on the main process only before it): the whole file is in the
# compatibility subset that also runs on the oldest transformers of the tested range.
pytestmark = pytest.mark.compat
import launching  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_trainer_worker.py")
LAUNCH_TIMEOUT_S = 420
RTOL = 2e-3

RUNS = {name: (launch, checkpoint, layout, dp, extra)
        for launch, spec in W.LAUNCHES.items() for name, checkpoint, layout, dp, extra in spec["runs"]}


@pytest.fixture(scope="session")
def trainer_checkpoints(tmp_path_factory) -> str:
    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    root = str(tmp_path_factory.mktemp("trainer-checkpoints"))
    for name, (model_type, overrides) in W.CHECKPOINTS.items():
        make_tiny_checkpoint(os.path.join(root, name), model_type, **overrides)
    return root


@pytest.fixture(scope="session")
def launch(trainer_checkpoints, tmp_path_factory):
    """`launch(name)` runs the worker for that launch once per session; returns (output folder, log)."""
    return launching.once_per_key(WORKER, trainer_checkpoints, tmp_path_factory, "trainer",
                                  lambda name: W.LAUNCHES[name]["world"], LAUNCH_TIMEOUT_S)


def record_of(launch, run: str) -> tuple[dict, str]:
    out, log = launch(RUNS[run][0])
    return launching.worker_record(out, run, log), os.path.join(out, run)


@pytest.fixture(scope="session")
def oracle(trainer_checkpoints, tmp_path_factory):
    """transformers' Trainer on AutoModelForCausalLM, the whole global batch on one device (cached)."""
    from transformers import AutoModelForCausalLM, Trainer

    cache: dict[str, dict] = {}

    def get(checkpoint: str) -> dict:
        if checkpoint not in cache:
            model = AutoModelForCausalLM.from_pretrained(os.path.join(trainer_checkpoints, checkpoint))
            vocab = model.config.vocab_size
            evaluation = W.make_dataset(vocab, W.EVAL_ROWS, 1)
            args = W.training_arguments(str(tmp_path_factory.mktemp(f"oracle-{checkpoint}")), W.GLOBAL_BATCH,
                                        save_strategy="no")
            trainer = Trainer(model=model, args=args, train_dataset=W.make_dataset(vocab, W.TRAIN_ROWS, 0),
                              eval_dataset=evaluation)
            trainer.train()
            prediction = trainer.predict(evaluation)
            cache[checkpoint] = {
                "train": W.history(trainer),
                "eval_loss": trainer.evaluate()["eval_loss"],
                "predict_loss": prediction.metrics["test_loss"],
                "predictions": torch.as_tensor(prediction.predictions),
                "model": model.eval(),
            }
        return cache[checkpoint]

    return get


def probe_batch(vocab: int) -> dict:
    rows = W.make_dataset(vocab, 4, 7)
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}


TRAINING_RUNS = [name for name in RUNS]
# runs whose final model is the last step's (load_best_model_at_end brings back an earlier one)
FINAL_MODEL_RUNS = [name for name in RUNS if not RUNS[name][4].get("args", {}).get("load_best_model_at_end")]


def tolerance(run: str) -> float:
    return RUNS[run][4].get("tolerance", RTOL)


@pytest.mark.parametrize("run", TRAINING_RUNS)
def test_per_step_losses_match_transformers(launch, oracle, run):
    record, _ = record_of(launch, run)
    expected = oracle(record["checkpoint"])["train"]
    assert record["train"]["steps"] == expected["steps"]
    torch.testing.assert_close(record["train"]["loss"], expected["loss"], rtol=tolerance(run), atol=0)
    torch.testing.assert_close(record["train"]["grad_norm"], expected["grad_norm"], rtol=tolerance(run), atol=0)
    torch.testing.assert_close(record["train"]["learning_rate"], expected["learning_rate"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("run", FINAL_MODEL_RUNS)
def test_eval_loss_matches_transformers(launch, oracle, run):
    record, _ = record_of(launch, run)
    assert record["eval_loss"] == pytest.approx(oracle(record["checkpoint"])["eval_loss"], rel=tolerance(run))


@pytest.mark.parametrize("run", FINAL_MODEL_RUNS)
def test_saved_folder_predicts_like_the_hf_trained_model(launch, oracle, run):
    from transformers import AutoModelForCausalLM

    record, folder = record_of(launch, run)
    expected_model = oracle(record["checkpoint"])["model"]
    saved = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "final")).eval()
    batch = probe_batch(expected_model.config.vocab_size)
    with torch.no_grad():
        ours, theirs = saved(**batch).logits, expected_model(**batch).logits
    assert ours.shape == theirs.shape
    limit = 1e-3 if tolerance(run) == RTOL else 0.1  # bf16 weights
    torch.testing.assert_close(ours.float(), theirs, rtol=limit, atol=limit)


@pytest.mark.parametrize("run", [name for name, spec in RUNS.items() if spec[4].get("predict")])
def test_predict_gathers_logits_over_data_parallel_ranks(launch, oracle, run):
    record, folder = record_of(launch, run)
    expected = oracle(record["checkpoint"])
    predictions = torch.load(os.path.join(folder, "predict.pt"))
    assert predictions.shape == expected["predictions"].shape
    torch.testing.assert_close(predictions, expected["predictions"], rtol=1e-3, atol=1e-3)
    assert record["predict_loss"] == pytest.approx(expected["predict_loss"], rel=RTOL)


@pytest.mark.parametrize("run", [name for name, spec in RUNS.items() if spec[4].get("resume")])
def test_resume_from_checkpoint_continues_bit_for_bit(launch, run):
    from safetensors.torch import load_file

    record, folder = record_of(launch, run)
    # Steps 1-2 come back with trainer_state.json; steps 3-4 are trained again, from checkpoint-2.
    assert record["resumed"]["steps"] == [1, 2, 3, 4]
    assert record["resumed"]["loss"] == record["train"]["loss"]
    assert record["resumed"]["grad_norm"] == record["train"]["grad_norm"]
    first = load_file(os.path.join(folder, "final", "model.safetensors"))
    second = load_file(os.path.join(folder, "resumed-final", "model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_resume_with_another_data_parallel_size(launch, trainer_checkpoints, tmp_path):
    """A dp=2 checkpoint resumes in a world of one (dp=1, per-device batch doubled): same global batches."""
    record, folder = record_of(launch, "dp2")
    checkpoint = os.path.join(folder, "train", "checkpoint-2")
    returncode, log = launching.launch(WORKER, ["resume-dp1", trainer_checkpoints, str(tmp_path), checkpoint], 1,
                                       LAUNCH_TIMEOUT_S, str(tmp_path / "worker.log"))
    assert returncode == 0, log[-6000:]
    with open(tmp_path / "record.json") as f:
        resumed = json.load(f)["resumed"]
    assert resumed["steps"] == [1, 2, 3, 4]
    torch.testing.assert_close(resumed["loss"], record["train"]["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(resumed["grad_norm"], record["train"]["grad_norm"], rtol=1e-5, atol=0)


def dist_checkpoint_tensors(checkpoint: str) -> dict:
    from megatron.core import dist_checkpointing

    folder = os.path.join(checkpoint, "mcore_state", "dist_ckpt")
    assert dist_checkpointing.check_is_distributed_checkpoint(folder)
    return dist_checkpointing.load_tensors_metadata(folder)


def test_checkpoint_holds_hf_weights_and_megatron_dist_checkpoint(launch):
    from transformers import AutoModelForCausalLM

    _, folder = record_of(launch, "tp2")
    checkpoint = os.path.join(folder, "train", "checkpoint-2")
    entries = set(os.listdir(checkpoint))
    assert {"config.json", "model.safetensors", "trainer_state.json", "scheduler.pt", "training_args.bin"} <= entries
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= entries
    assert {"layout.json", "dist_ckpt"} <= set(os.listdir(os.path.join(checkpoint, "mcore_state")))
    with open(os.path.join(checkpoint, "mcore_state", "layout.json")) as f:
        layout = json.load(f)
    assert (layout["tp"], layout["optimizer"]) == (2, "megatron")
    # megatron-core's format: tensors under their global shapes (written from two TP halves), AdamW moments beside
    tensors = dist_checkpoint_tensors(checkpoint)
    hidden, intermediate = 64, 128
    assert tensors["decoder.layers.mlp.linear_fc1.weight"].global_shape[-2:] == (2 * intermediate, hidden)
    assert tensors["optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight"].global_shape[-2:] == (
        2 * intermediate, hidden)
    AutoModelForCausalLM.from_pretrained(checkpoint)  # a checkpoint is also a plain HF model folder


def test_bf16_is_megatron_mixed_precision(launch):
    record, folder = record_of(launch, "tp1-bf16")
    assert record["dtype"] == "torch.bfloat16"  # the model computes in bf16; the optimizer holds fp32 masters
    tensors = dist_checkpoint_tensors(os.path.join(folder, "train", "checkpoint-2"))
    assert tensors["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    assert tensors["optimizer.state.fp32_param.embedding.word_embeddings.weight"].dtype == torch.float32


def test_load_best_model_at_end_restores_the_best_checkpoint(launch):
    from safetensors.torch import load_file

    record, folder = record_of(launch, "tp2-best")
    assert record["best_model_checkpoint"].endswith("checkpoint-2")
    best = load_file(os.path.join(folder, "train", "checkpoint-2", "model.safetensors"))
    last = load_file(os.path.join(folder, "train", "checkpoint-4", "model.safetensors"))
    final = load_file(os.path.join(folder, "final", "model.safetensors"))
    assert any(not torch.equal(best[k], last[k]) for k in best)
    for key in best:  # weights and fp32 masters back at checkpoint-2's (training continued from them would match)
        assert torch.equal(final[key], best[key]), key


def test_activation_checkpointing_is_megatron_recompute(launch):
    record, _ = record_of(launch, "pp2-recompute")
    assert record["recompute"] == "full"


@pytest.mark.parametrize("case,words", [
    ("hf_model", ["MCoreModelForCausalLM"]),
    ("micro_batch_size", ["micro_batch_size=3", "per_device_train_batch_size=4"]),
    ("label_smoothing", ["label_smoothing_factor"]),
    ("no_labels", ["labels"]),
])
def test_bad_input_is_refused_with_a_message(launch, case, words):
    record, _ = record_of(launch, "tp1")
    error = record["errors"][case]
    assert error is not None, f"{case} was accepted"
    assert error["type"] == "TrainingError"
    for word in words:
        assert word in error["message"]


def test_torch_ddp_options_are_reported_as_ignored(launch):
    record, _ = record_of(launch, "tp1")
    assert record["ddp_warning"], "no warning about ddp_find_unused_parameters"
