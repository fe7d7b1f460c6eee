"""Where MCoreModelForCausalLM.from_pretrained / save_pretrained spend their time (diagnosis helper).

    python benchmarks/profile_load.py [--small] [--tp N] [--cprofile]

(--tp 2 must run under torchrun --nproc_per_node=2; the numbers printed are rank 0's.)

Phase breakdown: every function `from_pretrained` calls by name from mcore_transformers.model.causal_lm
(build_model, bind_parameters, check_checkpoint, load_parameters, ...)
(and from mcore_transformers.model.loading, where the weights are read) is wrapped with a timer, and
`load_parameters` is split per rule type (time in `rule.load` and bytes handed out). Medians of
--repeats warm loads (one untimed warm-up first). With --cprofile, one load and one save are also
profiled and the top functions by own time printed.
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import gc
import os
import pstats
import shutil
import statistics
import sys
import time
import warnings

import torch

os.environ.setdefault("PYTHONWARNINGS", "ignore")
warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_save import DTYPE, ROOT, quiet_libraries  # noqa: E402
from make_checkpoint import make_checkpoint  # noqa: E402

PHASES = collections.defaultdict(list)
RULES = collections.defaultdict(lambda: [0.0, 0, 0])  # rule type -> [seconds, calls, bytes]


def timed(name, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[name].append(time.perf_counter() - start)
    return wrapper


def instrument() -> None:
    import types

    from mcore_transformers.model import causal_lm, loading
    from mcore_transformers.conversion import rules

    skip = {"cls", "logger", "load_weights"}  # load_weights: its parts are timed in loading.py
    for modeling in (causal_lm, loading):
        for name, value in list(vars(modeling).items()):
            if isinstance(value, types.FunctionType) and value.__module__.startswith("mcore_transformers") \
                    and name not in skip and not name.startswith("_is_"):
                setattr(modeling, name, timed(name, value))
    for modeling, name in ((causal_lm, "AutoConfig"), (loading, "CheckpointReader"), (causal_lm, "GenerationConfig")):
        if hasattr(modeling, name):
            obj = getattr(modeling, name)
            if name == "CheckpointReader":
                setattr(modeling, name, timed("CheckpointReader()", obj))
            else:
                cls_from = obj.from_pretrained
                setattr(obj, "from_pretrained", staticmethod(timed(f"{name}.from_pretrained", cls_from)))
    for cls in vars(rules).values():
        if isinstance(cls, type) and issubclass(cls, rules.Rule) and "load" in vars(cls):
            original = cls.load

            def load(self, source, hf_names, layout, _orig=original, _name=cls.__name__):
                if not hasattr(source, "bytes_read"):  # another TensorSource (e.g. peft's label source)
                    return _orig(self, source, hf_names, layout)
                before = source.bytes_read
                start = time.perf_counter()
                out = _orig(self, source, hf_names, layout)
                entry = RULES[_name]
                entry[0] += time.perf_counter() - start
                entry[1] += 1
                entry[2] += source.bytes_read - before
                return out
            cls.load = load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args()
    if os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")
    folder = make_checkpoint(args.small)
    quiet_libraries()
    torch.set_num_threads(1)  # see README: "Noise on this machine"
    from mcore_transformers import MCoreModelForCausalLM

    instrument()
    load = lambda: MCoreModelForCausalLM.from_pretrained(folder, tp=args.tp, dtype=DTYPE)  # noqa: E731
    del_model = load()
    del del_model
    PHASES.clear()
    RULES.clear()
    totals = []
    for _ in range(args.repeats):
        gc.collect()
        start = time.perf_counter()
        model = load()
        totals.append(time.perf_counter() - start)
        del model
    print(f"from_pretrained tp={args.tp}: median {statistics.median(totals):.3f}s over {args.repeats} "
          f"(min {min(totals):.3f}, max {max(totals):.3f}); load average {os.getloadavg()[0]:.2f}")
    print("  phase (median per call)")
    for name, values in sorted(PHASES.items(), key=lambda kv: -statistics.median(kv[1])):
        per_load = len(values) // args.repeats or 1
        print(f"    {name:<28} {statistics.median(values) * per_load:.4f}s  ({per_load} call(s) per load)")
    print("  load_parameters by rule type (per load: seconds, calls, MB handed out)")
    for name, (seconds, calls, nbytes) in sorted(RULES.items(), key=lambda kv: -kv[1][0]):
        print(f"    {name:<28} {seconds / args.repeats:.4f}s  {calls // args.repeats:4d}  {nbytes / args.repeats / 1e6:8.1f} MB")
    if args.cprofile:
        profiler = cProfile.Profile()
        gc.collect()
        profiler.enable()
        model = load()
        profiler.disable()
        print("\n=== cProfile: from_pretrained (top by own time) ===")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        target = os.path.join(ROOT, f"profile-save-{os.getpid()}")
        profiler = cProfile.Profile()
        profiler.enable()
        model.save_pretrained(target)
        profiler.disable()
        shutil.rmtree(target, ignore_errors=True)
        print("=== cProfile: save_pretrained (top by own time) ===")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
