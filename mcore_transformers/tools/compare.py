"""Tensor-by-tensor comparison of two HF folders (the converter's and the demo's bit-exactness check)."""

from __future__ import annotations


def compare_folders(source: str, target: str, dtype=None) -> tuple[int, int, list[str]]:
    """Compare every tensor of two HF folders (mapped, no copies).

    With `dtype`, the source tensors are cast to it first (the conversion's rounding is the only change).
    Returns (tensors compared, how many of them had to be cast, problems found).
    """
    import torch

    from ..conversion.reader import CheckpointReader

    problems = []
    with CheckpointReader(source) as src, CheckpointReader(target) as dst:
        names = src.names()
        missing, extra = sorted(set(names) - set(dst.names())), sorted(set(dst.names()) - set(names))
        if missing:
            problems.append(f"not in {target}: {missing[:6]}")
        if extra:
            problems.append(f"not in {source}: {extra[:6]}")
        differ, cast = [], 0
        for name in names:
            if name not in dst:
                continue
            a, b = src.read(name), dst.read(name)
            if dtype is not None and a.dtype != dtype:
                a, cast = a.to(dtype), cast + 1
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                differ.append(name)
        if differ:
            problems.append(f"{len(differ)} tensors differ: {differ[:6]}")
        return len(names), cast, problems
