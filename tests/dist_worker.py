"""Worker for one world: `python dist_worker.py 1 CKPT_ROOT OUT [RUN_IDS]` (world of one) or
`torchrun --nproc_per_node=2 dist_worker.py 2 ...`. It goes through the layouts of that world size
(tearing Megatron's parallel state down between them), loads every run of each layout in turn, and
records what it saw:

  OUT/<run id>/rank<r>.pt    parity runs: inputs, logits and loss per batch, export digests, num_parameters
  OUT/<run id>/saved/        parity runs: rank 0's save_pretrained folder
  OUT/<run id>/rank<r>.json  error runs: the exception raised (or none), files before/after;
                             any run that crashed unexpectedly: its traceback
  OUT/done.rank<r>           every layout finished

It judges nothing: the pytest side compares these with transformers.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dist_cases import (  # noqa: E402
    LAYOUTS, NOTES_TEXT, folder_snapshot, layouts_of_world, make_batches, resolve_source, runs_for,
)
from mcore_transformers import MCoreModelForCausalLM, destroy_parallel_state  # noqa: E402
from mcore_transformers.runtime.parallel import ParallelConfig, init_parallel_state  # noqa: E402

RANK = int(os.environ.get("RANK", 0))


def digest(tensor: torch.Tensor) -> list:
    """(shape, dtype, sha256 of the bytes): equal digests mean bit-identical tensors."""
    data = tensor.detach().cpu().contiguous()
    raw = data.view(torch.uint8) if data.numel() else data
    return [list(data.shape), str(data.dtype), hashlib.sha256(raw.numpy().tobytes()).hexdigest()]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(path + ".part", path)


def parity_run(run, root: str, out: str) -> None:
    layout = LAYOUTS[run.layout]
    model = MCoreModelForCausalLM.from_pretrained(
        os.path.join(root, run.checkpoint), tp=layout["tp"], pp=layout["pp"], vpp=layout["vpp"],
        sequence_parallel=run.sequence_parallel, dtype=getattr(torch, run.dtype),
    )
    outputs = {}
    for name, batch in make_batches(model.config.vocab_size).items():
        with torch.no_grad():
            result = model(**batch)
        outputs[name] = {"inputs": batch, "logits": result.logits.detach().cpu(), "loss": result.loss.detach().cpu()}
    exported = {name: digest(tensor) for name, tensor in model.export_hf_weights()}
    record = {
        "outputs": outputs,
        "export": exported,
        "export_order": list(exported),
        "num_parameters": model.num_parameters(),
        "model_dtype": str(model.dtype),
    }
    save_kwargs = {"max_shard_size": run.save_max_shard_size} if run.save_max_shard_size else {}
    os.makedirs(os.path.join(out, run.id), exist_ok=True)
    model.save_pretrained(os.path.join(out, run.id, "saved"), **save_kwargs)
    torch.save(record, os.path.join(out, run.id, f"rank{RANK}.pt"))
    del model


def save_target(error_run, out: str) -> str:
    """Create the bad save destination (rank 0) and return its path."""
    parent = os.path.join(out, error_run.id, "targets")
    target = os.path.join(parent, "target")
    if RANK == 0:
        os.makedirs(parent, exist_ok=True)
        if error_run.target == "file":
            with open(target, "w") as f:
                f.write(NOTES_TEXT)
    barrier()
    return target


def error_run(error_run, root: str, out: str) -> None:
    layout = LAYOUTS[error_run.layout]
    kwargs = dict(tp=layout["tp"], pp=layout["pp"], vpp=layout["vpp"])
    kwargs.update(error_run.kwargs)
    source = resolve_source(root, error_run.source)
    watched = source
    model = None
    if error_run.action == "save":
        model = MCoreModelForCausalLM.from_pretrained(source, **kwargs)
        watched = save_target(error_run, out)
    before = folder_snapshot(watched)
    raised = None
    try:
        if error_run.action == "load":
            MCoreModelForCausalLM.from_pretrained(source, **kwargs)
        else:
            model.save_pretrained(watched)
    except Exception as err:  # recorded, judged by the pytest side
        raised = {
            "type": type(err).__name__,
            "mro": [cls.__name__ for cls in type(err).__mro__],
            "module": type(err).__module__,
            "message": str(err),
        }
    barrier()
    parent = os.path.dirname(watched)
    record = {
        "raised": raised,
        "watched": watched,
        "before": before,
        "after": folder_snapshot(watched),
        "siblings": sorted(os.listdir(parent)) if os.path.isdir(parent) else None,
    }
    write_json(os.path.join(out, error_run.id, f"rank{RANK}.json"), record)
    del model


def run_layout(layout_name: str, root: str, out: str, only) -> None:
    parity, errors = runs_for(layout_name)
    for run in parity:
        if only and run.id not in only:
            continue
        try:
            parity_run(run, root, out)
        except Exception:
            write_json(os.path.join(out, run.id, f"rank{RANK}.json"), {"crashed": traceback.format_exc()})
        gc.collect()
        barrier()
    if only and any(bad.id in only for bad in errors):
        # The error runs expect the layout's parallel state up, as the parity runs before them leave it (a
        # selection may have skipped those: "layout-change-without-teardown" needs it).
        sizes = LAYOUTS[layout_name]
        init_parallel_state(ParallelConfig(tp=sizes["tp"], pp=sizes["pp"], vpp=sizes["vpp"]))
    for bad in errors:
        if only and bad.id not in only:
            continue
        try:
            error_run(bad, root, out)
        except Exception:
            write_json(os.path.join(out, bad.id, f"rank{RANK}.json"), {"crashed": traceback.format_exc()})
        gc.collect()
        barrier()


def main() -> None:
    world, root, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    only = set(sys.argv[4].split(",")) if len(sys.argv) > 4 and sys.argv[4] else None
    for index, layout_name in enumerate(layouts_of_world(world)):
        if index:
            destroy_parallel_state()  # the next layout initialises its own (torch.distributed stays up)
        run_layout(layout_name, root, out, only)
    with open(os.path.join(out, f"done.rank{RANK}"), "w") as f:
        f.write("ok\n")


if __name__ == "__main__":
    main()
