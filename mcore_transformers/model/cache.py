"""The KV cache `generate` threads through the model: a transformers `Cache` over megatron-core's memory.

megatron-core's attention writes each step's keys and values into a `StaticInferenceContext`
(`key_value_memory_dict[layer_number]`, `[max_len, batch, groups, head_dim]`) and attends over everything
cached so far. `MCoreKVCache` is a subclass of transformers' public `Cache` that owns that context, so
`GenerationMixin` handles it like any of its own caches: it reads `get_seq_length()` to slice the prompt,
calls `reorder_cache` for beams, `crop` for assisted decoding, `reset` and `batch_select_indices` /
`batch_repeat_interleave` where a decoding strategy needs them. Its `layers` are one `MCoreKVLayer` per
attention layer of this rank (its pipeline stage), each a view of that layer's memory in HF's layout.

Beside the context it keeps what megatron's static context does not know:
- the position id of every cached slot, per row (`positions`, `[components, rows, slots]`: one component for
  text, three for multimodal rotary). The model passes rotary angles itself, for the whole cached length every
  step (left-padded rows have their own positions, `cumsum(mask) - 1`).
- nothing about padding: the model builds an explicit `[b, 1, s, past + s]` mask from HF's 2-D attention
  mask every step (mcore's static context would decode with no mask at all).

The memory grows on demand when a forward needs more room than was reserved (plain `forward(use_cache=True)`
loops); `generate` reserves `max_length - 1` slots up front after checking they fit. Every rank of the
model-parallel group holds a cache for its own layers and steps it in lockstep.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import GenerationError


class MCoreKVLayer(CacheLayerMixin):
    """One attention layer of this rank in an `MCoreKVCache`: a view of megatron-core's memory for it.

    Whole-cache operations (length, crop, reorder) act on the shared context in `MCoreKVCache`; a layer
    reports its state and shows its keys and values as `[batch, kv_heads, cached, head_dim]` views.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False  # the whole history stays cached; sliding windows are applied by the attention mask
    supports_early_init = False  # megatron-core's attention allocates the memory on its first cached forward

    def __init__(self, cache: "MCoreKVCache", layer_number: int):  # noqa: D107 (no super: keys/values are views)
        self._cache = cache
        self.layer_number = layer_number

    def _memory(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return self._cache.context.key_value_memory_dict.get(self.layer_number)

    @property
    def is_initialized(self) -> bool:
        return self._memory() is not None

    @property
    def keys(self) -> Optional[torch.Tensor]:
        memory = self._memory()
        return None if memory is None else memory[0][: self.get_seq_length()].permute(1, 2, 0, 3)

    @property
    def values(self) -> Optional[torch.Tensor]:
        memory = self._memory()
        return None if memory is None else memory[1][: self.get_seq_length()].permute(1, 2, 0, 3)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise GenerationError(_WRITTEN_BY_MEGATRON)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise GenerationError(_WRITTEN_BY_MEGATRON)

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length()

    def get_max_length(self) -> int:
        return self._cache.max_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    # Whole-cache operations are done once by MCoreKVCache on the shared context.
    def reset(self) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass

    def offload(self) -> None:
        raise GenerationError("MCoreKVCache cannot be offloaded: megatron-core's attention reads it in place.")

    def prefetch(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"MCoreKVLayer(layer_number={self.layer_number})"


_WRITTEN_BY_MEGATRON = (
    "MCoreKVCache is written by megatron-core's attention modules inside the model's forward; it cannot be "
    "filled through Cache.update(). Pass it to MCoreModelForCausalLM (generate() does), not to another model."
)


class MCoreKVCache(Cache):
    """megatron-core's static inference context for `batch_size` rows and `max_length` tokens, as a transformers `Cache`.

    `layer_numbers` are megatron's (1-based, global) numbers of this rank's attention layers. Build it with
    `model.new_kv_cache(batch_size, max_length)`, or let `generate()` build it.
    """

    def __init__(
        self, batch_size: int, max_length: int, device: torch.device, layer_numbers: Sequence[int], components: int = 1
    ):
        if batch_size < 1 or max_length < 1:
            raise GenerationError(f"A KV cache needs batch_size >= 1 and max_length >= 1 (got {batch_size}, {max_length}).")
        if not layer_numbers:
            raise GenerationError("A KV cache needs the numbers of this rank's attention layers (model.new_kv_cache knows them).")
        super().__init__(layers=[MCoreKVLayer(self, number) for number in layer_numbers])
        self.context = StaticInferenceContext(max_batch_size=batch_size, max_sequence_length=max_length)
        # [components, rows, slots]: a text model's rotary has one position per token, multimodal rotary three
        self.positions = torch.zeros(components, batch_size, max_length, dtype=torch.long, device=device)

    # ---- transformers' Cache API -------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.context.max_batch_size

    @property
    def max_length(self) -> int:
        return self.context.max_sequence_length

    @property
    def is_compileable(self) -> bool:  # no torch.compile'd static-cache path for megatron's attention
        return False

    @property
    def is_croppable(self) -> bool:
        return True

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached per row (padding included, as in transformers' caches); the same for every layer."""
        return self.context.sequence_len_offset

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return self.max_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        raise GenerationError(_WRITTEN_BY_MEGATRON)

    def early_initialization(self, *args, **kwargs) -> None:
        """Nothing to do: megatron-core's attention allocates each layer's memory on its first cached forward."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes the cached keys, values and positions of row `beam_idx[i]` (in place)."""
        index = beam_idx.to(self.positions.device).long()
        if index.shape != (self.batch_size,):
            raise GenerationError(f"reorder_cache got {tuple(index.shape)} beam indices for a cache of {self.batch_size} rows.")
        length = self.get_seq_length()
        for key, value in self.context.key_value_memory_dict.values():
            key[:length] = key[:length].index_select(1, index.to(key.device))
            value[:length] = value[:length].index_select(1, index.to(value.device))
        self.positions[:, :, :length] = self.positions[:, :, :length].index_select(1, index)

    def crop(self, tokens: int) -> None:
        """Negative: drop that many tokens from the end; 0: nothing (transformers' rule).

        A positive count keeps the first `tokens` tokens, as transformers' caches did before (deprecated there).
        """
        length = self.get_seq_length()
        keep = length + tokens if tokens <= 0 else tokens
        self.context.sequence_len_offset = max(0, min(length, keep))

    def reset(self) -> None:
        """Forget every cached token (the memory stays allocated for the next prompt batch)."""
        self.context.reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row becomes `repeats` consecutive rows (keys, values and positions copied)."""
        self._select_rows(torch.arange(self.batch_size, device=self.positions.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices`, in that order."""
        self._select_rows(indices.to(self.positions.device).long().reshape(-1))

    def activate_past_recording(self) -> None:
        """Nothing to do: every cached token stays in memory, so `crop` can always roll back."""

    # ---- the model's side --------------------------------------------------------------------------
    def _select_rows(self, rows: torch.Tensor) -> None:
        memory = self.context.key_value_memory_dict
        for layer, tensors in memory.items():
            memory[layer] = tuple(t.index_select(1, rows.to(t.device)) for t in tensors)
        self.positions = self.positions.index_select(1, rows)
        self.context.max_batch_size = int(rows.numel())

    def reserve(self, length: int) -> None:
        """Make room for `length` tokens per row, copying what is cached into larger memory if needed."""
        if length <= self.max_length:
            return
        cached = self.get_seq_length()
        new_length = max(length, 2 * self.max_length)
        memory = self.context.key_value_memory_dict
        for layer, tensors in memory.items():
            grown = []
            for old in tensors:
                new = old.new_empty((new_length,) + tuple(old.shape[1:]))
                new[:cached] = old[:cached]
                grown.append(new)
            memory[layer] = tuple(grown)
        positions = self.positions.new_zeros(self.positions.shape[0], self.batch_size, new_length)
        positions[:, :, :cached] = self.positions[:, :, :cached]
        self.positions = positions
        self.context.max_sequence_length = new_length

    def begin_step(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Record the positions of the `s` tokens about to be cached; returns the positions of every cached token
        and these: `[b, past + s]` for `[b, s]` positions, `[c, b, past + s]` for `[c, b, s]` (multimodal rotary)."""
        components = position_ids.shape[0] if position_ids.dim() == 3 else 1
        if components != self.positions.shape[0]:
            raise GenerationError(
                f"This KV cache keeps {self.positions.shape[0]} rotary position component(s) per token but the forward "
                f"got {components}. Use a cache the model built for itself (model.new_kv_cache / generate())."
            )
        batch, seq = position_ids.shape[-2:]
        if batch != self.batch_size:
            raise GenerationError(
                f"This KV cache holds {self.batch_size} rows but the forward got a batch of {batch}. Use a cache "
                "built for this batch (generate() builds one itself; pass past_key_values=None)."
            )
        past = self.get_seq_length()
        self.reserve(past + seq)
        self.positions[:, :, past : past + seq] = position_ids.to(self.positions.device).reshape(components, batch, seq)
        cached = self.positions[:, :, : past + seq]
        return cached if position_ids.dim() == 3 else cached[0]

    def end_step(self, num_tokens: int) -> None:
        """The forward cached `num_tokens` new tokens per row (padding added for sequence parallelism excluded)."""
        self.context.increment_sequence_len_offset(num_tokens)
        self.context.enable_decode_mode()

    def __repr__(self) -> str:
        return (
            f"MCoreKVCache(rows={self.batch_size}, cached={self.get_seq_length()}, capacity={self.max_length}, "
            f"layers_on_this_rank={len(self)})"
        )
