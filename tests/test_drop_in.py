"""Scripts written for transformers and TRL, run on megatron-core with only their imports changed.

examples/drop_in/run_clm.py makes the calls of transformers' run_clm.py (from_pretrained with its keyword
arguments, the embedding-size check, Trainer, train / save_model / evaluate / save_state / create_model_card);
examples/drop_in/sft.py is TRL's documented SFTTrainer usage. Each runs as written on the HF model (the oracle),
then with the imports swapped, in one process (tp=1: transformers' / TRL's own trainers) and under torchrun
(tp=2, pp=2: MCoreTrainer / mcore_transformers.trl, the layout from MCORE_TRANSFORMERS_TP / _PP). The losses must
equal the oracle's and the folder the run saved must load in transformers and predict what it predicts.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import launching  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "mcore_transformers", "assets", "demo-model")
RUN_CLM = os.path.join(ROOT, "examples", "drop_in", "run_clm.py")
SFT = os.path.join(ROOT, "examples", "drop_in", "sft.py")
TIMEOUT_S = 400

SWAPS = {  # the whole change a user makes: import lines, nothing else
    "from transformers import AutoModelForCausalLM": "from mcore_transformers import MCoreModelForCausalLM as AutoModelForCausalLM",
    "from transformers import Trainer": "from mcore_transformers import MCoreTrainer as Trainer",
    "from trl import SFTTrainer": "from mcore_transformers.trl import SFTTrainer",
    "from trl import DPOTrainer": "from mcore_transformers.trl import DPOTrainer",
    "from trl import GRPOTrainer": "from mcore_transformers.trl import GRPOTrainer",
}
# run -> (script's imports swapped, world, MCORE_TRANSFORMERS_* layout)
RUNS = {
    "hf": ((), 1, {}),
    "tp1": (("from transformers import AutoModelForCausalLM",), 1, {}),
    "tp2": (tuple(SWAPS), 2, {"TP": "2"}),
    "pp2": (tuple(SWAPS), 2, {"PP": "2"}),
    "hf-dp2": ((), 2, {}),  # transformers / TRL with torch DDP over two processes: the oracle of dp2
    "dp2": (tuple(SWAPS), 2, {}),  # MCoreTrainer: two data-parallel replicas
}
sys.path.insert(0, os.path.dirname(SFT))
from sft import VERSES  # noqa: E402  (the example's own text, for run_clm's data file too)


def swapped_script(script: str, swaps: tuple[str, ...], folder: str) -> str:
    """The script with `swaps` applied; fails unless exactly those import lines changed."""
    with open(script) as f:
        original = f.read().splitlines(keepends=True)
    changed = [SWAPS[line.rstrip("\n")] + "\n" if line.rstrip("\n") in swaps else line for line in original]
    diff = [line for line in difflib.unified_diff(original, changed, n=0) if line[:1] in "+-" and line[:3] not in ("---", "+++")]
    assert len(diff) == 2 * len([s for s in swaps if s + "\n" in original]), diff
    path = os.path.join(folder, os.path.basename(script))
    with open(path, "w") as f:
        f.writelines(changed)
    return path


def _run(script: str, run: str, args: list[str], out: str) -> str:
    swaps, world, layout = RUNS[run]
    path = swapped_script(script, swaps, out)
    env = launching.worker_env(**{f"MCORE_TRANSFORMERS_{k}": v for k, v in layout.items()}, PYTHONPATH=ROOT)
    code, log = launching.launch(path, args, world, TIMEOUT_S, os.path.join(out, "run.log"), env)
    assert code == 0, f"{run} failed:\n{log[-6000:]}"
    return log


# ---- transformers' run_clm flow ------------------------------------------------------------------
CLM_ARGS = [
    "--model_name_or_path", DEMO, "--do_train", "--do_eval", "--block_size", "32", "--max_steps", "3",
    "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--learning_rate", "1e-3",
    "--logging_steps", "1", "--report_to", "none", "--use_cpu", "--seed", "0", "--dtype", "float32",
    "--save_strategy", "no", "--disable_tqdm", "true", "--train_sampling_strategy", "sequential",
]


@pytest.fixture(scope="module")
def clm_runs(tmp_path_factory):
    data = tmp_path_factory.mktemp("clm-data") / "data.txt"
    data.write_text("\n".join(VERSES * 6) + "\n")
    done = {}

    def get(run: str) -> str:
        if run not in done:
            out = str(tmp_path_factory.mktemp(f"clm-{run}"))
            _run(RUN_CLM, run, CLM_ARGS + ["--train_file", str(data), "--output_dir", out], out)
            done[run] = out
        return done[run]

    return get


def _losses(folder: str) -> list[float]:
    with open(os.path.join(folder, "trainer_state.json")) as f:
        return [entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry]


@pytest.mark.compat  # transformers' own Trainer and example flow: in the compatibility subset
@pytest.mark.parametrize("run", ["tp1", "tp2"])
def test_run_clm_flow_matches_transformers(clm_runs, run):
    """Per-step losses, eval loss and accuracy equal transformers'; the saved folder predicts like the HF-trained one."""
    from transformers import AutoModelForCausalLM

    oracle, ours = clm_runs("hf"), clm_runs(run)
    assert _losses(ours) == pytest.approx(_losses(oracle), rel=1e-5) and len(_losses(ours)) == 3
    with open(os.path.join(oracle, "eval_results.json")) as a, open(os.path.join(ours, "eval_results.json")) as b:
        expected, got = json.load(a), json.load(b)
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    assert got["eval_accuracy"] == pytest.approx(expected["eval_accuracy"], abs=1e-6)
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    trained = AutoModelForCausalLM.from_pretrained(oracle, dtype=torch.float32)(input_ids=ids, labels=ids).loss
    reloaded = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32)(input_ids=ids, labels=ids).loss
    assert reloaded.item() == pytest.approx(trained.item(), rel=1e-5)
    for name in ("README.md", "trainer_state.json", "eval_results.json", "train_results.json"):  # card, state, metrics
        assert os.path.exists(os.path.join(ours, name)), name


def test_run_clm_script_makes_run_clm_calls():
    """The example keeps run_clm.py's calls: changing one to suit megatron fails here."""
    tree = ast.parse(open(RUN_CLM).read())
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            calls.setdefault(name, []).append(sorted(k.arg for k in node.keywords if k.arg))
    assert ["cache_dir", "config", "dtype", "from_tf", "revision", "token", "trust_remote_code"] in calls[
        "AutoModelForCausalLM.from_pretrained"]
    assert calls["Trainer"] == [["args", "compute_metrics", "data_collator", "eval_dataset", "model",
                                 "preprocess_logits_for_metrics", "processing_class", "train_dataset"]]
    for method in ("trainer.train", "trainer.save_model", "trainer.evaluate", "trainer.save_state",
                   "trainer.create_model_card", "trainer.log_metrics", "trainer.save_metrics",
                   "model.resize_token_embeddings", "model.get_input_embeddings"):
        assert method in calls, method
    assert "model.get_input_embeddings().weight.shape[0]" in open(RUN_CLM).read()


# ---- TRL's SFTTrainer ----------------------------------------------------------------------------
SFT_RUNS = [("prompt-completion", "tp1"), ("prompt-completion", "tp2"), ("prompt-completion", "pp2"),
            ("packed-text", "tp1"), ("packed-text", "tp2")]


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    done = {}

    def get(kind: str, run: str) -> str:
        if (kind, run) not in done:
            out = str(tmp_path_factory.mktemp(f"sft-{kind}-{run}"))
            _run(SFT, run, [DEMO, out, kind], out)
            done[(kind, run)] = out
        return done[(kind, run)]

    return get


@pytest.mark.parametrize("kind,run", SFT_RUNS, ids=[f"{k}-{r}" for k, r in SFT_RUNS])
def test_trl_sft_matches_trl_on_transformers(sft_runs, kind, run):
    """Completion-only loss and padding-free packing: per-step losses equal TRL's on the HF model."""
    from transformers import AutoModelForCausalLM

    oracle, ours = sft_runs(kind, "hf"), sft_runs(kind, run)
    with open(os.path.join(oracle, "losses.json")) as a, open(os.path.join(ours, "losses.json")) as b:
        expected, got = json.load(a), json.load(b)
    assert len(got) == 4 and got == pytest.approx(expected, rel=1e-5), (got, expected)
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    trained = AutoModelForCausalLM.from_pretrained(oracle, dtype=torch.float32)(input_ids=ids, labels=ids).loss
    reloaded = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32)(input_ids=ids, labels=ids).loss
    assert reloaded.item() == pytest.approx(trained.item(), rel=1e-5)


# ---- TRL's DPO and GRPO: TRL's own trainers at tp = pp = 1, mcore_transformers.trl's under tp / pp ---------------
RL_RUNS = [(script, run) for script in ("dpo", "grpo") for run in ("tp1", "tp2", "pp2")] + [("dpo", "dp2"), ("dpo-lora", "tp2")]


@pytest.fixture(scope="module")
def rl_logs(tmp_path_factory):
    done = {}

    def get(script: str, run: str) -> list:
        if (script, run) not in done:
            out = str(tmp_path_factory.mktemp(f"{script}-{run}"))
            name, _, variant = script.partition("-")
            _run(os.path.join(ROOT, "examples", "drop_in", f"{name}.py"), run, [DEMO, out] + [variant] * bool(variant), out)
            with open(os.path.join(out, "logs.json")) as f:
                done[(script, run)] = json.load(f)
        return done[(script, run)]

    return get


@pytest.mark.parametrize("script,run", RL_RUNS, ids=[f"{s}-{r}" for s, r in RL_RUNS])
def test_trl_dpo_and_grpo_match_trl_on_transformers(rl_logs, script, run):
    """DPO with a reference model or, with LoRA, the adapter disabled (three steps, then evaluation), GRPO generating
    through `generate` mid-training:
    every logged number of every step (loss, rewards, KL, grad norm, eval loss and rewards) equals TRL on the HF
    model. Under tp / pp TRL's own loss is replayed through megatron's schedule (training/replay.py); at dp=2 the
    replicas' gradients are averaged as torch DDP averages them (the oracle runs TRL under DDP)."""
    expected, ours = rl_logs(script, "hf-dp2" if run == "dp2" else "hf"), rl_logs(script, run)
    assert len(ours) == (4 if script.startswith("dpo") else 3) and [sorted(step) for step in ours] == [sorted(step) for step in expected]
    for got, want in zip(ours, expected):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, got, want)
