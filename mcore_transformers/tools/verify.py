"""HF-vs-mcore precision check: the same inputs through both models, numbers compared against tolerances.

`verify(path, tp=..., ...)` loads the checkpoint twice — as megatron-core modules in the requested
layout, and as the transformers model (the oracle) — runs both on one deterministic left-padded batch
with labels, and compares what a user sees: the logits at every non-padding position, their argmax,
and the loss. It raises `VerificationError` (carrying the report) when a number is past its tolerance
and returns the `VerifyReport` otherwise. It never uses `assert`, so `python -O` checks the same.

Tolerances (the defaults; `atol` replaces the logits bound, `loss_atol` the loss bound):

    dtype              max |Δ logit|                   |Δ loss|                    argmax agreement
    float32            1e-4 + 1e-5 · max|HF logit|     1e-5 + 1e-6 · HF loss       ≥ 99%
    bfloat16/float16   5e-2 + 2e-2 · max|HF logit|     1e-2 + 5e-3 · HF loss       ≥ 95%

Why these: in float32 the two implementations differ only in summation order (fused QKV and
gate/up GEMMs, TP partial sums), which moves logits by ~1e-7 relative; 1e-4 absolute leaves room
for deep models and still catches any wrong weight, head layout or rotary setting (those move
logits by 1e-2 and more). In 16-bit formats one rounding step of a logit of magnitude 16 is
already 0.06 (bfloat16 keeps 8 significant bits), and both models round at different places, so
the logits bound scales with the logit magnitude (about 2.5 bfloat16 steps of the largest logit)
and the argmax may flip on near-ties; a real conversion bug still fails all three checks by far.

Collective: call it on every rank (under torchrun) with the same arguments. The mcore model is
sharded across ranks; the transformers model is loaded on global rank 0 only (it is the full model,
and one copy is enough; on GPU machines it runs on rank 0's GPU when it fits there, else on the CPU),
and rank 0's report is broadcast, so every rank returns (or raises) the same thing. The check also
confirms that every rank got the same logits, as the facade promises.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

from ..errors import MCoreTransformersError

if TYPE_CHECKING:
    import torch

# torch, transformers and megatron are imported inside the functions: importing this module (and the
# package's public names with it) stays cheap for the command line's launcher process.

# dtype -> (logits atol, logits rtol vs max |HF logit|, loss atol, loss rtol vs HF loss, min argmax agreement)
TOLERANCES: dict[str, tuple[float, float, float, float, float]] = {
    "float32": (1e-4, 1e-5, 1e-5, 1e-6, 0.99),
    "bfloat16": (5e-2, 2e-2, 1e-2, 5e-3, 0.95),
    "float16": (5e-2, 2e-2, 1e-2, 5e-3, 0.95),
}


class VerificationError(MCoreTransformersError):
    """The mcore model's outputs differ from the transformers model's by more than the tolerances.

    `.report` holds the full `VerifyReport`.
    """

    def __init__(self, report: "VerifyReport"):
        self.report = report
        super().__init__(
            f"mcore and transformers disagree on {report.model} ({', '.join(report.failures)}).\n{report}\n"
            "A disagreement in float32 means a conversion or layout bug: report it with this table."
        )

    def __reduce__(self):  # picklable with its report (it is broadcast between ranks)
        return (type(self), (self.report,))


@dataclass
class VerifyReport:
    """What `verify` measured, the bounds it used, and whether each check passed."""

    model: str
    model_type: str
    num_parameters: int
    tp: int
    pp: int
    vpp: Optional[int]
    ep: int
    sequence_parallel: bool
    world_size: int
    dtype: str
    batch_size: int
    seq_len: int
    num_tokens: int  # non-padding positions compared
    seed: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    argmax_agreement: float
    mcore_loss: float
    hf_loss: float
    loss_diff: float
    max_rank_logit_diff: float  # largest difference between any rank's logits and rank 0's
    logits_tolerance: float
    loss_tolerance: float
    min_argmax_agreement: float
    timings: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def layout(self) -> str:
        vpp = self.vpp if self.vpp else "-"
        sp = "on" if self.sequence_parallel else "off"
        return f"tp={self.tp} pp={self.pp} vpp={vpp} ep={self.ep} sp={sp}"

    def __str__(self) -> str:
        def mark(ok: bool) -> str:
            return "ok" if ok else "FAIL"

        rows = [
            ("max |Δ logit|", f"{self.max_abs_logit_diff:.3e}", f"≤ {self.logits_tolerance:.3e}",
             mark(self.max_abs_logit_diff <= self.logits_tolerance)),
            ("mean |Δ logit|", f"{self.mean_abs_logit_diff:.3e}", "", ""),
            ("argmax agreement", f"{100 * self.argmax_agreement:.2f}%", f"≥ {100 * self.min_argmax_agreement:.2f}%",
             mark(self.argmax_agreement >= self.min_argmax_agreement)),
            ("loss mcore / HF", f"{self.mcore_loss:.6f} / {self.hf_loss:.6f}", "", ""),
            ("|Δ loss|", f"{self.loss_diff:.3e}", f"≤ {self.loss_tolerance:.3e}",
             mark(self.loss_diff <= self.loss_tolerance)),
            ("ranks agree (max |Δ|)", f"{self.max_rank_logit_diff:.3e}", f"≤ {self.logits_tolerance:.3e}",
             mark(self.max_rank_logit_diff <= self.logits_tolerance)),
        ]
        width = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            f"model   {self.model} ({self.model_type}, {self.num_parameters:,} parameters)",
            f"layout  {self.layout}, world size {self.world_size}, {self.dtype}",
            f"inputs  batch {self.batch_size} × {self.seq_len} tokens, left-padded, "
            f"{self.num_tokens} positions compared (seed {self.seed})",
        ]
        lines += [f"  {a:<{width[0]}}  {b:>{width[1]}}  {c:<{width[2]}}  {d}".rstrip() for a, b, c, d in rows]
        lines.append(f"result  {'PASS' if self.passed else 'FAIL: ' + ', '.join(self.failures)}")
        return "\n".join(lines)


def make_inputs(batch_size: int, seq_len: int, vocab_size: int, pad_token_id: int, seed: int):
    """A deterministic left-padded batch: row i has i·seq_len/(2·batch) pads (row 0 none, at least one token each).

    Returns input_ids, attention_mask, position_ids (counting from each row's first real token, as a
    left-padded batch is fed in practice) and labels (-100 on padding).
    """
    import torch

    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}: need batch_size >= 1 and seq_len >= 2.")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for row in range(batch_size):
        pads = min(row * seq_len // (2 * batch_size), seq_len - 2)
        attention_mask[row, :pads] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_token_id)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, position_ids, labels


def _dtype(dtype: Union[str, "torch.dtype"]) -> "torch.dtype":
    import torch

    name = str(dtype).replace("torch.", "")
    if name not in TOLERANCES:
        raise ValueError(f"dtype={dtype}: verify supports float32, bfloat16 and float16.")
    return getattr(torch, name)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:
        return False


def _max_rank_diff(logits: "torch.Tensor") -> float:
    """Largest |difference| between this rank's logits and rank 0's, reduced over all ranks."""
    import torch.distributed as dist

    if _world() == 1:
        return 0.0
    reference = logits.detach().float().contiguous().clone()
    dist.broadcast(reference, src=0)
    diff = (logits.detach().float() - reference).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())


def verify(
    path: str,
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    ep: int = 1,
    sequence_parallel: bool = False,
    dtype: Union[str, "torch.dtype"] = "float32",
    batch_size: int = 2,
    seq_len: int = 32,
    atol: Optional[float] = None,
    seed: int = 0,
    *,
    loss_atol: Optional[float] = None,
    model=None,
) -> VerifyReport:
    """Compare the mcore model (layout tp/pp/vpp/ep) with the transformers model on one batch.

    Collective under torchrun. Returns the report when every check passes; raises
    `VerificationError` (with the report) otherwise. `atol` / `loss_atol` replace the default
    logits / loss bounds (see the module docstring). Pass an already loaded `model`
    (MCoreModelForCausalLM) to check it against the HF folder `path` instead of loading `path` (the
    layout arguments are then read from the model).
    """
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from ..model.causal_lm import MCoreModelForCausalLM
    from ..multimodal.image_text import MCoreModelForImageTextToText

    dtype = _dtype(dtype)
    timings: dict[str, float] = {}
    reference = path  # a model passed in may come from elsewhere (e.g. a distributed checkpoint of `path`)
    config = model.config if model is not None else AutoConfig.from_pretrained(path)
    multimodal = getattr(config, "vision_config", None) is not None  # checked with a synthetic image
    mcore_class = MCoreModelForImageTextToText if multimodal else MCoreModelForCausalLM
    if model is None:
        start = time.perf_counter()
        model = mcore_class.from_pretrained(
            path, tp=tp, pp=pp, vpp=vpp, ep=ep, sequence_parallel=sequence_parallel, dtype=dtype
        )
        timings["load mcore"] = time.perf_counter() - start
        reference = model.source_folder or path  # a Hub id, resolved
    elif model.dtype != dtype:
        raise ValueError(f"The model passed is {model.dtype}, but dtype={dtype} was asked for.")
    layout = model.layout
    config = model.config
    text = model.language_config
    pad = text.pad_token_id if isinstance(getattr(text, "pad_token_id", None), int) else 0
    input_ids, attention_mask, position_ids, labels = make_inputs(batch_size, seq_len, text.vocab_size, pad, seed)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
    if multimodal:  # the model computes its multimodal positions itself, as transformers' does
        from ..multimodal.synthetic import add_synthetic_image

        inputs.pop("position_ids")
        inputs = add_synthetic_image(config, inputs, seed)

    start = time.perf_counter()
    with torch.no_grad():
        out = model(**inputs)
    timings["forward mcore"] = time.perf_counter() - start
    max_rank_diff = _max_rank_diff(out.logits)  # on the model's device (NCCL needs GPU tensors)
    mcore_logits = out.logits.detach().float().cpu()
    num_parameters = model.num_parameters()  # collective the first time

    # Only rank 0 loads the transformers model; it builds the report (or the error) and broadcasts it.
    result: list = [None]
    from ..runtime.parallel import is_rank0  # torch is imported lazily here

    if is_rank0():
        try:
            auto_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
            result[0] = _compare_with_hf(auto_class, reference, dtype, inputs, mcore_logits, out.loss, timings)
        except Exception as err:  # re-raised on every rank, so no rank waits forever
            result[0] = err if _picklable(err) else RuntimeError(f"{type(err).__name__}: {err}")
    if _world() > 1:
        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], Exception):
        raise result[0]
    measured, timings = result[0]

    atol_default, rtol, loss_atol_default, loss_rtol, min_agreement = TOLERANCES[str(dtype).replace("torch.", "")]
    scale = measured.pop("hf_logit_scale")
    logits_tolerance = atol if atol is not None else atol_default + rtol * scale
    loss_tolerance = loss_atol if loss_atol is not None else loss_atol_default + loss_rtol * abs(measured["hf_loss"])
    report = VerifyReport(
        model=str(path), model_type=config.model_type, num_parameters=num_parameters,
        tp=layout.tp, pp=layout.pp, vpp=layout.vpp, ep=layout.ep, sequence_parallel=layout.sequence_parallel,
        world_size=_world(), dtype=str(dtype).replace("torch.", ""), batch_size=batch_size, seq_len=seq_len,
        seed=seed, max_rank_logit_diff=max_rank_diff, logits_tolerance=logits_tolerance,
        loss_tolerance=loss_tolerance, min_argmax_agreement=min_agreement, timings=timings, **measured,
    )
    checks = {
        "max |Δ logit|": report.max_abs_logit_diff <= logits_tolerance,
        "argmax agreement": report.argmax_agreement >= min_agreement,
        "|Δ loss|": report.loss_diff <= loss_tolerance,
        "ranks agree": report.max_rank_logit_diff <= logits_tolerance,
    }
    report.failures = [name for name, ok in checks.items() if not ok]  # NaN compares False: fails too
    if not report.passed:
        raise VerificationError(report)
    return report


def _compare_with_hf(auto_cls, folder, dtype, inputs, mcore_logits, mcore_loss, timings):
    """Rank 0: load the transformers model, run it on the same batch, measure the differences."""
    import torch

    from ..runtime.parallel import default_device

    start = time.perf_counter()
    hf = auto_cls.from_pretrained(folder, dtype=dtype)
    hf.eval()
    device = torch.device("cpu")
    if torch.cuda.is_available():  # beside rank 0's shard when it fits, else on the CPU
        try:
            hf.to(default_device())
            device = default_device()
        except torch.OutOfMemoryError:
            hf.to("cpu")
            torch.cuda.empty_cache()
    timings["load transformers"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        ref = hf(**{name: tensor.to(device) for name, tensor in inputs.items()})
    timings["forward transformers"] = time.perf_counter() - start
    hf_logits = ref.logits.detach().float().cpu()
    if hf_logits.shape != mcore_logits.shape:
        raise RuntimeError(
            f"Logits shapes differ: mcore {list(mcore_logits.shape)}, transformers {list(hf_logits.shape)}."
        )
    valid = inputs["attention_mask"].bool()
    a, b = mcore_logits[valid], hf_logits[valid]  # [tokens, vocab]
    diff = (a - b).abs()
    hf_loss = float(ref.loss.float().item())
    mcore_loss_value = float(mcore_loss.float().item())
    measured = dict(
        num_tokens=int(valid.sum().item()),
        max_abs_logit_diff=float(diff.max().item()),
        mean_abs_logit_diff=float(diff.mean().item()),
        argmax_agreement=float((a.argmax(-1) == b.argmax(-1)).float().mean().item()),
        mcore_loss=mcore_loss_value,
        hf_loss=hf_loss,
        loss_diff=abs(mcore_loss_value - hf_loss) if math.isfinite(mcore_loss_value) else float("inf"),
        hf_logit_scale=float(b.abs().max().item()),
    )
    return measured, timings
