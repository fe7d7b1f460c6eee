"""First run on a CUDA machine: parity, generate, a training step, LoRA and speed against transformers, one table.

    bash benchmarks/gpu_check.sh                    # on the GPU machine: installs the carried wheels, runs this
    python benchmarks/gpu_check.py --out table.md   # wherever the package imports (CPU: gloo, the same checks)
    python benchmarks/gpu_check.py --list           # the checks, without running them

Every check runs the real path against transformers on the same checkpoint and prints one row:

    parity tp=1 / tp=2, fp32 and bf16   `mcore_transformers.verify` (logits, argmax, loss within its tolerances);
                                        tp=2 runs under nccl when 2 GPUs are there (NCCL refuses two ranks on one GPU)
    generate                            greedy tokens of a left-padded batch equal transformers' (fp32)
    trainer step                        2 MCoreTrainer steps with megatron-core's optimizer: losses equal HF Trainer's
    lora                                peft LoRA on both models, same adapter weights: logits and adapter gradients
    load / forward / decode             median wall time, mcore / transformers, on a ~300M bf16 model (--small: ~7M)

The layer spec is Transformer Engine's when TE imports, else megatron-core's local spec (the table says which).
Exit code 0 when every check that ran passed. The whole run takes a few minutes on one GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

CHECKS = ("parity-tp1", "parity-tp2", "generate", "trainer-step", "lora", "speed")


@dataclass
class Row:
    check: str
    result: str  # PASS / FAIL / skipped
    detail: str


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.md", help="where the table is written (default: gpu_check.md)")
    parser.add_argument("--only", nargs="+", choices=CHECKS, help="run these checks only")
    parser.add_argument("--small", action="store_true", help="speed on a ~7M model instead of ~300M (quick)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per speed measurement (default 5)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode length for the speed rows (default 64)")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temporary folder)")
    parser.add_argument("--list", action="store_true", help="print the checks and exit")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 2:
        parser.error("--repeats must be >= 1 and --new-tokens >= 2")
    return args


def environment() -> dict:
    import torch
    import transformers

    from mcore_transformers.model.building import transformer_engine_available

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "CPU",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "megatron-core": _version("megatron-core"),
        "peft": _version("peft"),
        "layer spec": "Transformer Engine" if transformer_engine_available() else "megatron-core local (no TE)",
    }


def _version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _exact_fp32() -> None:
    """fp32 parity means fp32: no TF32 in matmuls or convolutions."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def tiny_checkpoints(workdir: str) -> dict[str, str]:
    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    folders = {}
    for name, model_type in (("llama", "llama"), ("qwen3", "qwen3")):
        folders[name] = os.path.join(workdir, name)
        if not os.path.exists(os.path.join(folders[name], "config.json")):
            make_tiny_checkpoint(folders[name], model_type, seed=0)
    return folders


# ---- the checks ---------------------------------------------------------------------------------------
def check_parity_tp1(ckpt: dict, args) -> list[Row]:
    from mcore_transformers import VerificationError, destroy_parallel_state, verify

    rows = []
    for dtype in ("float32", "bfloat16"):
        try:
            report = verify(ckpt["qwen3"], tp=1, dtype=dtype)
            rows.append(Row(f"parity tp=1 {dtype}", "PASS", _report_text(report)))
        except VerificationError as err:
            rows.append(Row(f"parity tp=1 {dtype}", "FAIL", _report_text(err.report)))
        destroy_parallel_state()
    return rows


def _report_text(report) -> str:
    return (f"max Δlogit {report.max_abs_logit_diff:.2e} (≤ {report.logits_tolerance:.1e}), "
            f"argmax {100 * report.argmax_agreement:.1f}%, Δloss {report.loss_diff:.1e}")


def check_parity_tp2(ckpt: dict, args) -> list[Row]:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        return [Row("parity tp=2", "skipped", "needs 2 GPUs: NCCL refuses two ranks on one GPU")]
    rows = []
    for dtype in ("float32", "bfloat16"):
        # The command starts its two ranks itself (nccl on GPUs, gloo on CPU).
        command = [sys.executable, "-m", "mcore_transformers.tools.cli", "verify", ckpt["qwen3"], "--tp", "2", "--dtype", dtype]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=_child_env())
        lines = [" ".join(line.replace("|", "").split()) for line in proc.stdout.splitlines()
                 if "max |Δ logit|" in line or "argmax agreement" in line]
        rows.append(Row(f"parity tp=2 {dtype}", "PASS" if proc.returncode == 0 else "FAIL",
                        "; ".join(lines)[:160] or (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]))
    return rows


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def check_generate(ckpt: dict, args) -> list[Row]:
    import torch
    from transformers import AutoModelForCausalLM

    from mcore_transformers import MCoreModelForCausalLM, destroy_parallel_state

    _exact_fp32()
    device = _device()
    ids = torch.randint(3, 250, (3, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :5] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = dict(attention_mask=mask.to(device), max_new_tokens=24, pad_token_id=0, eos_token_id=None)
    hf = AutoModelForCausalLM.from_pretrained(ckpt["llama"], dtype=torch.float32).to(device).eval()
    expected = hf.generate(ids.to(device), **kwargs).cpu()
    model = MCoreModelForCausalLM.from_pretrained(ckpt["llama"], dtype=torch.float32)
    got = model.generate(ids.to(device), **kwargs).cpu()
    beams_hf = hf.generate(ids.to(device), num_beams=3, **kwargs).cpu()
    beams = model.generate(ids.to(device), num_beams=3, **kwargs).cpu()
    del model, hf
    destroy_parallel_state()
    same = torch.equal(expected, got) and torch.equal(beams_hf, beams)
    return [Row("generate fp32 (greedy, beams=3)", "PASS" if same else "FAIL",
                f"3 left-padded prompts × 24 tokens: {'token-identical' if same else 'tokens differ'}")]


def check_trainer_step(ckpt: dict, args) -> list[Row]:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from mcore_transformers import MCoreModelForCausalLM, MCoreTrainer, destroy_parallel_state

    _exact_fp32()
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            for ids in torch.randint(3, 250, (8, 24), generator=generator)]
    losses = {}
    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1,
                      report_to=[], disable_tqdm=True, save_strategy="no", seed=0, train_sampling_strategy="sequential",
                      use_cpu=not torch.cuda.is_available())
        for name in ("transformers", "mcore"):
            if name == "mcore":
                model = MCoreModelForCausalLM.from_pretrained(ckpt["llama"], dtype=torch.float32)
                trainer = MCoreTrainer(model=model, args=TrainingArguments(**common), train_dataset=data, megatron_optimizer=True)
            else:
                model = AutoModelForCausalLM.from_pretrained(ckpt["llama"], dtype=torch.float32)
                trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data)
            trainer.train()
            losses[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            del trainer, model
    destroy_parallel_state()
    diff = max(abs(a - b) for a, b in zip(losses["mcore"], losses["transformers"]))
    ok = len(losses["mcore"]) == 2 and diff < 1e-4
    return [Row("trainer 2 steps (megatron-core optimizer)", "PASS" if ok else "FAIL",
                f"losses {[round(x, 5) for x in losses['mcore']]} vs HF {[round(x, 5) for x in losses['transformers']]}, "
                f"max Δ {diff:.1e}")]


def check_lora(ckpt: dict, args) -> list[Row]:
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from mcore_transformers import MCoreModelForCausalLM, destroy_parallel_state

    _exact_fp32()
    device = _device()
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt["llama"], dtype=torch.float32).to(device), LoraConfig(**config))
    mcore = get_peft_model(MCoreModelForCausalLM.from_pretrained(ckpt["llama"], dtype=torch.float32), LoraConfig(**config))
    set_peft_model_state_dict(mcore, get_peft_model_state_dict(hf))
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(3)).to(device)
    outputs = {}
    for name, model in (("hf", hf), ("mcore", mcore)):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {k: p.grad.detach().float().cpu() for k, p in model.named_parameters() if "lora_B" in k and p.grad is not None}
        outputs[name] = (out.logits.detach().float().cpu(), grads)
    logit_diff = (outputs["hf"][0] - outputs["mcore"][0]).abs().max().item()
    shared = sorted(set(outputs["hf"][1]) & set(outputs["mcore"][1]))
    grad_diff = max((outputs["hf"][1][k] - outputs["mcore"][1][k]).abs().max().item() for k in shared) if shared else float("inf")
    del hf, mcore
    destroy_parallel_state()
    ok = logit_diff < 1e-4 and grad_diff < 1e-4 and len(shared) == len(outputs["hf"][1]) > 0
    return [Row("lora forward + backward (q, v, down)", "PASS" if ok else "FAIL",
                f"max Δlogit {logit_diff:.1e}, max Δ lora_B grad {grad_diff:.1e} over {len(shared)} adapters")]


def check_speed(ckpt: dict, args) -> list[Row]:
    import torch
    from transformers import AutoModelForCausalLM

    from generate import make_checkpoint
    from mcore_transformers import MCoreModelForCausalLM, destroy_parallel_state

    folder = make_checkpoint(small=args.small)
    device = _device()
    times: dict[str, dict[str, list[float]]] = {"mcore": {}, "hf": {}}
    ids = torch.randint(3, 8000, (8, 128), generator=torch.Generator().manual_seed(0)).to(device)
    gen_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def load(name):
        if name == "mcore":
            return MCoreModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()

    models = {name: load(name) for name in ("mcore", "hf")}  # untimed: first loads carry one-off set-up
    for repeat in range(args.repeats):
        order = ("mcore", "hf") if repeat % 2 == 0 else ("hf", "mcore")  # alternate who goes first
        for name in order:
            del models[name]
            _sync()
            models[name] = _timed(times[name], "load", lambda: load(name))
            with torch.no_grad():
                _timed(times[name], "forward", lambda: models[name](input_ids=ids).logits)
                _timed(times[name], "generate", lambda: models[name].generate(ids[:1, :32], **gen_kwargs))
    models.clear()
    destroy_parallel_state()
    rows = []
    for what, label in (("load", "load (from_pretrained)"), ("forward", "forward 8×128"),
                        ("generate", f"decode 1×{args.new_tokens} tokens")):
        mcore, hf = statistics.median(times["mcore"][what]), statistics.median(times["hf"][what])
        spread = max(times["mcore"][what]) - min(times["mcore"][what])
        rows.append(Row(f"{label}, mcore / HF", "info",
                        f"{mcore / hf:.2f}× ({mcore * 1e3:.1f} ms vs {hf * 1e3:.1f} ms median of {args.repeats}, "
                        f"mcore spread {spread * 1e3:.1f} ms)"))
    return rows


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(store: dict, what: str, fn: Callable):
    _sync()
    start = time.perf_counter()
    value = fn()
    _sync()
    store.setdefault(what, []).append(time.perf_counter() - start)
    return value


RUNNERS = {
    "parity-tp1": check_parity_tp1, "parity-tp2": check_parity_tp2, "generate": check_generate,
    "trainer-step": check_trainer_step, "lora": check_lora, "speed": check_speed,
}


def table(rows: list[Row], env: dict, seconds: float) -> str:
    lines = ["# mcore_transformers GPU check", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [f"- wall time: {seconds:.0f} s", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {row.check} | {row.result} | {row.detail.replace('|', '/')} |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    chosen = args.only or list(CHECKS)
    if args.list:
        print("\n".join(chosen))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mcore_transformers.tools.launch import quiet_libraries

    quiet_libraries()
    start = time.perf_counter()
    env = environment()
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="mcore-gpu-check-"))
        ckpt = tiny_checkpoints(workdir)
        for name in chosen:
            began = time.perf_counter()
            try:
                rows += RUNNERS[name](ckpt, args)
            except Exception as err:  # one broken check must not hide the others
                rows.append(Row(name, "FAIL", f"{type(err).__name__}: {str(err).splitlines()[0][:150]}"))
                traceback.print_exc()
            print(f"[gpu_check] {name}: {time.perf_counter() - began:.1f}s", file=sys.stderr, flush=True)
    text = table(rows, env, time.perf_counter() - start)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    return 0 if all(row.result != "FAIL" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
