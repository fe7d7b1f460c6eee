"""The vocabulary as transformers scripts see it: full-size embedding views, and resize_token_embeddings, under TP/PP.

megatron-core splits the embedding and the LM head by vocabulary rows over tensor-parallel ranks (padded to a
multiple of tp) and holds them on the first / last pipeline stage. Scripts written for transformers read
`model.get_input_embeddings().weight.shape[0]` to decide whether to resize, write rows of the embedding
matrix, and call `resize_token_embeddings`. Here:

- `VocabView` is what `get_input_embeddings()` / `get_output_embeddings()` return on every rank: its `weight`
  is the full `[vocab_size, hidden]` matrix. At tp = pp = 1 that is the parameter itself. Otherwise it is
  gathered over TP and broadcast over PP (collective, so every rank of the model reads it, as every rank runs
  the script), and in-place writes to it (`weight[ids] = rows`, `weight.data[...]`, `normal_()`) go back into
  every shard that holds those rows, the tied LM head included.
- `resize_vocabulary` grows or shrinks the vocabulary: the new rows are drawn by transformers' own
  `_get_resized_embeddings` / `_get_resized_lm_head` on a full-size copy, with every rank drawing from rank 0's
  random state, so they equal what transformers draws for the HF model under the same seed (checked against
  transformers 5.19.0 and 5.24.0, where both helpers are identical). Each rank keeps its new shard, laid out by
  the family's own vocabulary rule; tied weights stay tied.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from ..conversion.binding import BoundParam
from ..conversion.exporter import gather_full
from ..conversion.rules import InMemorySource, ShardLayout, VocabColumn
from ..errors import MCoreTransformersError, UnsupportedModelError
from .lockstep import sampling_in_lockstep

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"  # megatron's name of the input embedding


def input_name(model) -> str:
    """The HF name of the input embedding (`model.embed_tokens.weight`, or where a multimodal checkpoint nests it)."""
    return next(rule.hf[0] for rule in model.arch.rules() if rule.mcore == WORD_EMBEDDINGS)


class FullVocabWeight(torch.Tensor):
    """A gathered copy of a full `[vocab_size, hidden]` matrix whose in-place writes reach the shards."""

    _write_back: Callable[[torch.Tensor], None]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        in_place = name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))
        if in_place and args and isinstance(args[0], FullVocabWeight):
            args[0]._write_back(args[0].as_subclass(torch.Tensor))
        return result

    @property
    def data(self) -> "FullVocabWeight":  # `weight.data[ids] = rows` is a write too
        return self


class VocabView(nn.Module):
    """The full-vocabulary face of a sharded embedding or LM head (what `get_input_embeddings()` returns).

    `multiplier`: the factor the model applies to the embedding output (Gemma's sqrt(hidden)), applied by `forward` too,
    as transformers' scaled embedding module does."""

    def __init__(self, model, hf_name: str, source_stage: int, multiplier: Optional[float] = None):
        super().__init__()
        self.__dict__.update(_model=model, hf_name=hf_name, source_stage=source_stage, multiplier=multiplier)

    @property
    def num_embeddings(self) -> int:
        return self._model.language_config.vocab_size

    @property
    def embedding_dim(self) -> int:
        return self._model.language_config.hidden_size

    out_features = num_embeddings
    in_features = embedding_dim

    bias = None  # megatron's vocabulary layers have none (transformers' LM heads neither)

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix. With tp = pp = 1 it is the parameter itself (trainable, hooks and all); otherwise a
        copy gathered over the model's ranks (collective) whose in-place writes go back into the shards."""
        whole = self._whole_parameter()
        if whole is not None:
            return whole
        full = gather_vocab(self._model, self.hf_name, self.source_stage).as_subclass(FullVocabWeight)
        full._write_back = lambda tensor: scatter_vocab(self._model, self.hf_name, tensor)
        return full

    def _whole_parameter(self) -> Optional[nn.Parameter]:
        layout = self._model.shard_layout
        if layout.tp_size > 1 or layout.padded_vocab_size != layout.vocab_size or _pipeline_group() is not None:
            return None
        items = vocab_items(self._model, self.hf_name)
        return items[0].param if len(items) == 1 else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `input_ids` ([..., hidden]): collective, like `weight`."""
        weight = self.weight
        if isinstance(weight, FullVocabWeight):
            weight = weight.as_subclass(torch.Tensor)
        rows = nn.functional.embedding(input_ids.to(self._model.device), weight)
        return rows if self.multiplier is None else rows * torch.tensor(self.multiplier).to(rows.dtype)

    def extra_repr(self) -> str:
        return f"{self.hf_name}: {self.num_embeddings} × {self.embedding_dim}, sharded by megatron-core"


def vocab_items(model, hf_name: str) -> list[BoundParam]:
    """This rank's bound vocabulary parameters that hold `hf_name`'s rows (an embedding, a tied head copy)."""
    return [item for item in model._bound if isinstance(item.rule, VocabColumn) and item.hf_names == (hf_name,)]


def output_name(model) -> Optional[str]:
    """The HF name of the LM head's rows: the embedding's when tied, else the head's own (None: no head)."""
    if model.arch.tie_word_embeddings:
        return input_name(model)
    heads = [rule.hf[0] for rule in model.arch.rules() if isinstance(rule, VocabColumn) and rule.hf[0] != input_name(model)]
    return heads[0] if heads else None


def _pipeline_group():
    if not dist.is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    return ps.get_pipeline_model_parallel_group()


def gather_vocab(model, hf_name: str, source_stage: int) -> torch.Tensor:
    """The full `[vocab_size, hidden]` tensor of `hf_name` on every rank (TP gather, then PP broadcast)."""
    items = vocab_items(model, hf_name)
    full = gather_full(items[0], model.shard_layout)[0] if items else None
    group = _pipeline_group()
    if group is None:
        if full is None:
            raise MCoreTransformersError(f"No rank holds {hf_name}.")
        return full.detach().clone()
    ranks = dist.get_process_group_ranks(group)
    source = ranks[source_stage]
    if full is None or dist.get_rank() != source:
        param = next(p for p in model.parameters())
        full = torch.empty(model.language_config.vocab_size, model.language_config.hidden_size, dtype=param.dtype, device=param.device)
    else:
        full = full.detach().clone()
    dist.broadcast(full, src=source, group=group)
    return full


@torch.no_grad()
def scatter_vocab(model, hf_name: str, full: torch.Tensor) -> None:
    """Copy every rank's rows of the full tensor `full` into the shards that hold `hf_name` (no communication:
    every rank of the model holds the same full tensor)."""
    source = InMemorySource({hf_name: full})
    for item in vocab_items(model, hf_name):
        item.param.copy_(item.rule.load(source, (hf_name,), model.shard_layout))


def resize_vocabulary(model, new_num_tokens: Optional[int], pad_to_multiple_of: Optional[int], mean_resizing: bool) -> int:
    """Collective over the world: grow or shrink the vocabulary as transformers would; returns the new size."""
    from transformers import PreTrainedModel

    if model.arch.lm_head_bias():
        raise UnsupportedModelError(
            "resize_token_embeddings on a model whose LM head has a bias (lm_head_bias=True) is not implemented (the "
            "bias would keep the old vocabulary). Resize the transformers model, save it, and load that folder."
        )
    config = model.language_config
    old_size, hidden = config.vocab_size, config.hidden_size
    embeddings_name = input_name(model)
    head = output_name(model)
    embeddings = gather_vocab(model, embeddings_name, 0)
    lm_head = gather_vocab(model, head, -1) if head is not None and head != embeddings_name else embeddings
    old_embeddings = _embedding(embeddings, old_size, hidden)
    with sampling_in_lockstep(dist.group.WORLD if _several_ranks() else None):
        # transformers' own arithmetic and random draws, in its order (embeddings, then the head even when tied).
        new_embeddings = PreTrainedModel._get_resized_embeddings(
            model, old_embeddings, new_num_tokens, pad_to_multiple_of, mean_resizing
        )
        new_size = new_embeddings.weight.shape[0]
        new_head = None
        if head is not None:
            old_head = nn.Linear(hidden, old_size, bias=False, device="meta")  # meta: no random draw
            old_head.weight = nn.Parameter(lm_head, requires_grad=False)
            new_head = PreTrainedModel._get_resized_lm_head(model, old_head, new_size, mean_resizing=mean_resizing)
    if new_size == old_size:
        return old_size
    layout = model.shard_layout
    tp = layout.tp_size
    model.shard_layout = replace(layout, vocab_size=new_size, padded_vocab_size=-(-new_size // tp) * tp)
    tensors = {embeddings_name: new_embeddings.weight.data}
    if new_head is not None and head != embeddings_name:
        tensors[head] = new_head.weight.data
    for name, tensor in tensors.items():
        for item in vocab_items(model, name):
            _replace_shard(item, item.rule.load(InMemorySource({name: tensor}), (name,), model.shard_layout))
    _resize_modules(model, model.shard_layout)
    config.vocab_size = new_size
    model._plan = None
    return new_size


def _embedding(weight: torch.Tensor, rows: int, hidden: int) -> nn.Embedding:
    embedding = nn.Embedding(rows, hidden, device="meta")
    embedding.weight = nn.Parameter(weight, requires_grad=False)
    return embedding


def _several_ranks() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _replace_shard(item: BoundParam, shard: torch.Tensor) -> None:
    """Put `shard` in place of the parameter, keeping megatron's attributes (TP partition, shared embedding)."""
    old = item.param
    new = nn.Parameter(shard.to(device=old.device, dtype=old.dtype).contiguous(), requires_grad=old.requires_grad)
    for name, value in vars(old).items():
        setattr(new, name, value)
    setattr(item.module, item.attr, new)


def _resize_modules(model, layout: ShardLayout) -> None:
    """The size bookkeeping of megatron's vocabulary modules, for the new padded vocabulary."""
    per_rank = layout.padded_vocab_size // layout.tp_size
    start, stop = layout.tp_rank * per_rank, (layout.tp_rank + 1) * per_rank
    for chunk in model.chunks:
        chunk = getattr(chunk, "module", chunk)
        chunk.vocab_size = layout.padded_vocab_size
        if chunk.pre_process:
            embedding = chunk.embedding.word_embeddings
            embedding.num_embeddings = layout.padded_vocab_size
            embedding.vocab_start_index, embedding.vocab_end_index = start, stop
            embedding.num_embeddings_per_partition = stop - start
        if chunk.post_process:
            chunk.output_layer.output_size = layout.padded_vocab_size
            chunk.output_layer.output_size_per_partition = stop - start

