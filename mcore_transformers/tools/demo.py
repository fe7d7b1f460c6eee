"""`mcore-transformers demo`: the two-minute tour, offline, on this machine's CPUs.

One command; the CLI starts the processes (2 by default) and every rank runs `run_demo`:

0. start     the processes are up and have imported torch, transformers and megatron-core
1. model     the trained demo model shipped in mcore_transformers/assets/demo-model when present,
             else a small random llama written by transformers itself (or --model PATH)
2. load      MCoreModelForCausalLM.from_pretrained(model, tp=2): each rank reads only its shards
3. verify    against AutoModelForCausalLM on the same left-padded batch (mcore_transformers.tools.verify)
4. generate  greedy continuation with model.generate, compared token for token with transformers
5. save      model.save_pretrained(output): gathered from the ranks, written by rank 0
6. reload    the saved folder with plain transformers: weights bit-exact, logits equal to the original

Only rank 0 prints; each step shows its wall time. Any mismatch makes the command exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..runtime.parallel import broadcast_from_rank0
from .compare import compare_folders
from .launch import SCRATCH_ENV, STARTED_ENV, quiet_libraries

ASSET_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo-model"

# The random fallback: small enough to run in seconds on 2 cores, big enough to be a real llama
# (GQA, llama3 rope scaling, untied head) that splits over 2 or 4 tensor-parallel ranks.
DEMO_CONFIG = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, max_position_embeddings=512,
)
PROMPTS = ["Once upon a time", "The capital of France is"]
NEW_TOKENS = 16
INDENT = " " * 13


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


@contextlib.contextmanager
def progress_hidden():
    """Keep the loading / saving progress bars off the narrative; replay them if the step fails."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise


def say(text: str = "") -> None:
    if _rank() == 0:
        print(text, flush=True)


def step(number: int, name: str, text: str, seconds: float) -> None:
    say(f"{number:>2}. {name:<9}{text}  ({seconds:.2f}s)")


def detail(text: str) -> None:
    for line in str(text).splitlines():
        say(INDENT + line)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _pick_model(args: argparse.Namespace) -> tuple[str, str, Optional[str]]:
    """(folder, how it was chosen, a temporary folder to remove when done or None). Rank 0 decides and writes.

    A generated model goes to the launcher's scratch folder (removed by the launcher once every rank
    has exited, whatever happened) or, under torchrun, to a temporary folder rank 0 removes on success.
    """
    if args.model:
        return args.model, "your model", None
    if (ASSET_MODEL / "config.json").exists():
        return str(ASSET_MODEL), "the demo model shipped with mcore_transformers", None
    from .tiny import make_tiny_checkpoint

    scratch = os.environ.get(SCRATCH_ENV)
    folder = os.path.join(scratch, "demo-model") if scratch else tempfile.mkdtemp(prefix="mcore-demo-model-")
    make_tiny_checkpoint(folder, "llama", seed=0, **DEMO_CONFIG)
    return folder, "a random llama written by transformers (no trained demo model is shipped)", folder


def _load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:  # no tokenizer files: the demo shows token ids instead of text
        return None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer if tokenizer.pad_token is not None else None  # a batch of prompts needs a pad token


def _prompts(tokenizer, vocab_size: int, pad_id: int):
    if tokenizer is not None:
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        return batch["input_ids"], batch["attention_mask"]
    from .verify import make_inputs

    input_ids, attention_mask, _, _ = make_inputs(2, 8, vocab_size, pad_id, seed=1)
    return input_ids, attention_mask


def run_demo(args: argparse.Namespace) -> int:

    world = int(os.environ.get("WORLD_SIZE", 1))
    device = "CUDA, nccl" if torch.cuda.is_available() else "CPU, gloo"
    say(f"mcore-transformers demo: a transformers checkpoint run by megatron-core, tensor-parallel (tp={args.tp}) "
        f"over {world} local process{'es' if world > 1 else ''} ({device})\n")
    began = float(os.environ.get(STARTED_ENV, time.time()))  # when the command was typed (wall clock)
    quiet_libraries()
    import megatron.core
    import transformers

    from ..conversion.writer import check_save_target
    from ..errors import MCoreTransformersError
    from ..model.causal_lm import MCoreModelForCausalLM  # noqa: F401  (imported here, so that step 0 owns the time)
    from ..runtime.parallel import init_distributed

    init_distributed()
    say(f" 0. start    {world} process{'es' if world > 1 else ''} up: torch {torch.__version__}, transformers "
        f"{transformers.__version__}, megatron-core {megatron.core.__version__} imported  ({time.time() - began:.2f}s)")
    output = os.path.abspath(args.output)

    source, how, temporary, code = None, None, None, 1
    try:
        start = time.perf_counter()
        if _rank() == 0:
            try:
                check_save_target(output)  # before any work: no point in failing at step 5
                source, how, temporary = _pick_model(args)
            except Exception as err:  # shared with the other ranks so that they stop too
                source = err
        source, how, temporary = broadcast_from_rank0((source, how, temporary))
        if isinstance(source, Exception):
            raise source
        code = _tour(args, source, how, temporary is not None, output, start, began)
        return code
    except (MCoreTransformersError, ValueError) as err:  # bad layout, bad output folder, bad checkpoint
        say(f"\nFAIL: {err}")
        return 1
    finally:
        # Only once every rank is done with it (after a failure another rank may still be reading).
        if temporary and code == 0 and _rank() == 0 and SCRATCH_ENV not in os.environ:
            shutil.rmtree(temporary, ignore_errors=True)


def _tour(args, source: str, how: str, temporary: bool, output: str, start: float, began: float) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.causal_lm import MCoreModelForCausalLM
    from .verify import VerificationError, make_inputs, verify

    world = dist.get_world_size()
    config = AutoConfig.from_pretrained(source)
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    step(1, "model", how, time.perf_counter() - start)
    detail(f"{source}{'  (temporary: removed at the end)' if temporary else ''}")
    heads = f"{config.num_attention_heads} heads ({config.num_key_value_heads} KV)"
    detail(f"{config.model_type}: hidden {config.hidden_size}, {config.num_hidden_layers} layers, {heads}, "
           f"vocab {config.vocab_size}, {str(dtype).replace('torch.', '')}")

    # 2. load, sharded
    start = time.perf_counter()
    with progress_hidden():
        model = MCoreModelForCausalLM.from_pretrained(source, tp=args.tp, dtype=dtype)
    total = model.num_parameters()
    local = [0] * world
    dist.all_gather_object(local, sum(p.numel() for p in model.parameters()))
    step(2, "load", f"MCoreModelForCausalLM.from_pretrained(model, tp={args.tp})", time.perf_counter() - start)
    dp = world // args.tp
    per_rank = ", ".join(f"rank {r}: {_millions(n)}" for r, n in enumerate(local))
    detail(f"{_millions(total)} parameters; each rank holds its shard ({per_rank})"
           + (f"; {dp} data-parallel replicas" if dp > 1 else ""))

    # 3. verify against transformers
    start = time.perf_counter()
    try:
        report = verify(source, model=model, dtype=dtype)
    except VerificationError as err:
        step(3, "verify", "against AutoModelForCausalLM: MISMATCH", time.perf_counter() - start)
        detail(err.report)
        say("\nFAIL: the mcore model does not match transformers.")
        return 1
    step(3, "verify", f"against AutoModelForCausalLM on a left-padded batch of {report.batch_size} × "
         f"{report.seq_len} tokens", time.perf_counter() - start)
    detail(str(report).split("\n", 2)[2])  # the table; model and layout were said above

    # 4. generate, token for token
    failures = []
    start = time.perf_counter()
    tokenizer = _load_tokenizer(source)
    pad_id = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id
    input_ids, attention_mask = _prompts(tokenizer, config.vocab_size, pad_id)
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id)
    with torch.no_grad():
        ours = model.generate(input_ids, attention_mask=attention_mask, **settings).cpu()
    same = None
    if _rank() == 0:
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        with torch.no_grad():
            theirs = hf.generate(input_ids, attention_mask=attention_mask, **settings)
        same = ours.shape == theirs.shape and torch.equal(ours, theirs)
    # In float32 a greedy path must match token for token. In 16-bit formats both models round at
    # different places, so a near-tie may go either way (the logits were checked in step 3).
    exact_dtype = dtype == torch.float32
    verdict = "the same tokens as" if same else ("DIFFERENT tokens from" if exact_dtype else "a different path than")
    step(4, "generate", f"model.generate (greedy, {NEW_TOKENS} new tokens): {verdict} transformers' generate",
         time.perf_counter() - start)
    if _rank() == 0:
        prompt_len = input_ids.shape[1]
        for row in range(ours.shape[0]):
            new = ours[row, prompt_len:]
            if tokenizer is not None:
                prompt = tokenizer.decode(input_ids[row][attention_mask[row].bool()], skip_special_tokens=True)
                detail(f"{prompt!r} -> {tokenizer.decode(new, skip_special_tokens=True)!r}")
            else:
                detail(f"prompt {input_ids[row][attention_mask[row].bool()].tolist()} -> {new.tolist()}")
        if not same:
            detail(f"transformers: {theirs[:, prompt_len:].tolist()}")
            if exact_dtype:
                failures.append("generate")
            else:
                detail(f"(in {str(dtype).replace('torch.', '')} a near-tie can flip a greedy step; not a failure)")

    # 5. save
    start = time.perf_counter()
    with progress_hidden():
        model.save_pretrained(output)
    step(5, "save", f"model.save_pretrained({_display(output)!r})", time.perf_counter() - start)
    if _rank() == 0:
        files = sorted(os.listdir(output))
        detail(f"gathered from {world} ranks, written by rank 0: {', '.join(files)}")

    # 6. reload with plain transformers
    start = time.perf_counter()
    if _rank() == 0:
        reloaded = AutoModelForCausalLM.from_pretrained(output, dtype="auto")
        original = AutoModelForCausalLM.from_pretrained(source, dtype=reloaded.dtype)
        count, cast, problems = compare_folders(source, output, dtype=dtype)
        ids, mask, positions, _ = make_inputs(2, 32, config.vocab_size, pad_id, seed=2)
        with torch.no_grad():
            a = reloaded(input_ids=ids, attention_mask=mask, position_ids=positions).logits[mask.bool()]
            b = original(input_ids=ids, attention_mask=mask, position_ids=positions).logits[mask.bool()]
        logits_equal = torch.equal(a, b)
        step(6, "reload", f"AutoModelForCausalLM.from_pretrained({_display(output)!r})", time.perf_counter() - start)
        if problems:
            detail(f"weights: MISMATCH: {'; '.join(problems)}")
            failures.append("weights")
        else:
            after = f" (after the cast of {cast} to {str(dtype).replace('torch.', '')})" if cast else ""
            detail(f"weights: all {count} tensors bit-identical to the original checkpoint{after}")
        if logits_equal:
            detail(f"logits:  identical to the original model's ({a.shape[0]} positions × {a.shape[1]} vocab)")
        else:
            detail(f"logits:  DIFFER from the original model's (max |Δ| {(a - b).abs().max().item():.3e})")
            failures.append("reload logits")
    failures = broadcast_from_rank0(failures)  # also: every rank is past its last use of the source folder

    elapsed = time.time() - began
    say()
    if failures:
        say(f"FAIL ({', '.join(failures)}) after {elapsed:.1f}s.")
        return 1
    say(f"PASS in {elapsed:.1f}s. {_display(output)} is a plain transformers folder (safetensors, source config "
        "copied verbatim): AutoModelForCausalLM and vLLM load it as is.")
    return 0


def _display(path: str) -> str:
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path
