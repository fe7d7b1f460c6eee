"""One HF projection inside a megatron linear (`Projection`) and the module peft sees for it (`ProjectionSlot`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class Projection:
    """One HF projection inside a megatron linear, as far as this rank holds it."""

    path: str  # HF module path, e.g. "model.layers.3.self_attn.q_proj"
    shape: tuple[int, int]  # HF weight shape (out_features, in_features)
    split_dim: int  # 0: output rows (column-parallel linear); 1: input columns (row-parallel linear)
    hf_index: torch.Tensor  # HF rows (split_dim 0) / columns (1) this rank holds, in local order
    local_index: torch.Tensor  # their positions along split_dim of the local megatron weight

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]


class ProjectionSlot(nn.Linear):
    """What peft sees of one HF projection: its name, its HF shape, no weights of its own.

    It is an `nn.Linear` so that peft's own dispatch (and `target_modules="all-linear"`) picks it;
    the LoRA layer peft builds around it is then adopted by the containing `ViewNode`. `weight` is a
    zero tensor of the HF shape that owns no memory (an expanded scalar): it tells peft the device
    and dtype, and code that would read the real weight through it reads zeros instead.
    """

    def __init__(self, host, projection: Projection, unsupported: Optional[str] = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = projection.shape
        # Plain attributes (not submodules): the megatron linear belongs to the chunks, not to this view.
        self.__dict__.update(host=host, projection=projection, unsupported=unsupported)

    @property
    def weight(self) -> torch.Tensor:
        base = self.host.linear.weight
        return base.new_zeros(()).expand(self.out_features, self.in_features)

    @property
    def bias(self) -> None:
        return None

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"{self.projection.path} is a named view for peft; its output is computed inside the megatron linear "
            f"{self.host.name}. Call the model, not this module."
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, computed_in={self.host.name}"
