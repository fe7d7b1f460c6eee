"""KV-cache adapter between transformers' `generate` and megatron-core's inference context.

`MCoreKVCache` is the object HF's generation loop carries as `past_key_values`. It owns a
megatron-core `StaticInferenceContext`: mcore's attention modules write each step's keys and values
into the context's per-layer memory (`key_value_memory_dict[layer_number]`, `[max_len, batch, groups,
head_dim]`) and attend over everything cached so far. What mcore's static context does not know, this
class keeps beside it:

- the position id of every cached slot, per row (`positions`). We pass rotary angles ourselves; mcore
  slices them `[sequence_len_offset : offset + s]` for the queries and `[: offset + s]` for the cached
  keys, so every step gets the angles of the whole cached length. Left-padded rows have their own
  positions (`cumsum(mask) - 1`, as HF computes them), so the angles are per row.
- nothing about padding: the model's forward builds an explicit `[b, 1, s, past + s]` mask from HF's
  2-D attention mask every step (mcore's static context would decode with no mask at all), and our
  attention core applies it.

Beam search reorders rows in place (`reorder_cache`); `crop` rolls back (assisted decoding); the
memory grows on demand when a forward needs more room than was reserved (plain `forward(use_cache=True)`
loops), and `generate` reserves exactly `max_length - 1` slots up front after checking they fit.

Every rank of the model-parallel group holds a cache for its own layers (its pipeline stage, its TP
share of the KV heads); all ranks step it in lockstep because every rank runs the same `generate` loop.

The layer-spec classes of fast_layers.py make decoding fast (building.py uses them):
`RotaryCachedSelfAttention` caches keys after rotary instead of re-rotating the whole cache every
step, `SdpaDotProductAttention` runs torch's sdpa at inference, and eval-mode forwards skip
megatron's training-only machinery.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext

from .errors import GenerationError  # noqa: F401  (raised here; importable from this module too)


class MCoreKVCache:
    """The KV cache `generate` threads through the model: megatron-core's static inference context plus positions.

    `batch_size` rows (prompts × beams or × return sequences) and room for `max_length` tokens per row.
    Attention layers allocate their key/value memory on their first cached forward.
    """

    is_compileable = False  # HF: no torch.compile'd static-cache path for this object
    is_croppable = True  # HF: `crop` can roll back steps

    def __init__(self, batch_size: int, max_length: int, device: torch.device):
        if batch_size < 1 or max_length < 1:
            raise GenerationError(f"A KV cache needs batch_size >= 1 and max_length >= 1 (got {batch_size}, {max_length}).")
        self.context = StaticInferenceContext(max_batch_size=batch_size, max_sequence_length=max_length)
        self.positions = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)

    # ---- HF Cache interface ------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.context.max_batch_size

    @property
    def max_length(self) -> int:
        return self.context.max_sequence_length

    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        """Tokens cached per row (padding included, as in HF's caches)."""
        return self.context.sequence_len_offset

    def get_max_cache_shape(self, layer_idx: Optional[int] = 0) -> int:
        return self.max_length

    def __len__(self) -> int:  # number of cached layers on this rank
        return len(self.context.key_value_memory_dict)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes the cached keys, values and positions of row `beam_idx[i]` (in place)."""
        length = self.get_seq_length()
        index = beam_idx.to(self.positions.device).long()
        if index.shape != (self.batch_size,):
            raise GenerationError(f"reorder_cache got {tuple(index.shape)} beam indices for a cache of {self.batch_size} rows.")
        for key, value in self.context.key_value_memory_dict.values():
            key[:length] = key[:length].index_select(1, index.to(key.device))
            value[:length] = value[:length].index_select(1, index.to(value.device))
        self.positions[:, :length] = self.positions[:, :length].index_select(0, index)

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens (negative: drop that many from the end), as HF's caches do."""
        length = self.get_seq_length()
        keep = length + max_length if max_length < 0 else max_length
        self.context.sequence_len_offset = max(0, min(length, keep))

    def reset(self) -> None:
        """Forget every cached token (the memory stays allocated for the next prompt batch)."""
        self.context.reset()

    # ---- the model's side --------------------------------------------------------------------------
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
        positions = self.positions.new_zeros(self.batch_size, new_length)
        positions[:, :cached] = self.positions[:, :cached]
        self.positions = positions
        self.context.max_sequence_length = new_length

    def begin_step(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Record the positions of the `s` tokens about to be cached; returns `[b, past + s]` positions."""
        batch, seq = position_ids.shape
        if batch != self.batch_size:
            raise GenerationError(
                f"This KV cache holds {self.batch_size} rows but the forward got a batch of {batch}. Use a cache "
                "built for this batch (generate() builds one itself; pass past_key_values=None)."
            )
        past = self.get_seq_length()
        self.reserve(past + seq)
        self.positions[:, past : past + seq] = position_ids.to(self.positions.device)
        return self.positions[:, : past + seq]

    def end_step(self, num_tokens: int) -> None:
        """The forward cached `num_tokens` new tokens per row (padding added for sequence parallelism excluded)."""
        self.context.increment_sequence_len_offset(num_tokens)
        self.context.enable_decode_mode()

    def __repr__(self) -> str:
        return (
            f"MCoreKVCache(rows={self.batch_size}, cached={self.get_seq_length()}, capacity={self.max_length}, "
            f"layers_on_this_rank={len(self)})"
        )


# ---- generate() helpers used by the model ----------------------------------------------------------

def kv_cache_bytes(chunks, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
    """Bytes of key + value memory this rank's attention layers allocate for a cache of that size."""
    total = 0
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            attention = layer.self_attention
            per_token = attention.num_query_groups_per_partition * (attention.key_hidden_size + attention.val_hidden_size)
            total += per_token * batch_size * max_length * torch.tensor([], dtype=dtype).element_size()
    return total


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Free memory on the device the cache will live on (None when it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def check_cache_fits(
    chunks, batch_size: int, rows: int, max_length: int, dtype: torch.dtype, device: torch.device, group
) -> None:
    """Refuse (on every rank of `group` together) a cache that does not fit in free memory."""
    needed = kv_cache_bytes(chunks, rows, max_length, dtype)
    free = available_memory_bytes(device)
    short = 1.0 if free is not None and needed > 0.9 * free else 0.0
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        flag = torch.tensor([short], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        short = flag.item()
    if short:
        expand = rows // batch_size
        where = f"only {_gib(free)} is free on this rank" if free is not None and needed > 0.9 * free else (
            "another rank of the model does not have that much free memory"
        )
        raise GenerationError(
            f"The KV cache for {batch_size} prompt(s) × {expand} beam(s)/return sequence(s) = {rows} rows of "
            f"{max_length} tokens needs {_gib(needed)} on this rank, but {where}. Lower the batch size, "
            "num_beams / num_return_sequences or max_new_tokens, spread the layers over more ranks (tp / pp), "
            "or pass use_cache=False (slower: recomputes the whole sequence every step)."
        )


def model_parallel_group():
    """The group of ranks that hold one copy of the model (they must generate in lockstep), or None."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


def _group_source(group) -> int:
    return dist.get_process_group_ranks(group)[0]


@contextlib.contextmanager
def sampling_in_lockstep(group):
    """Every rank of `group` samples with the random state of the group's first rank.

    Under tp / pp every rank runs HF's generate loop on identical logits; sampling draws from torch's
    global generator, so the ranks must hold the same generator state or they pick different tokens
    (and the pipeline stalls on mismatched shapes). The first rank's state is broadcast when generate
    starts, so a seed set there reproduces what transformers samples in a single process.
    """
    if group is None:
        yield
        return
    states = [torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None]
    dist.broadcast_object_list(states, src=_group_source(group), group=group)
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1])
    yield


def check_ranks_agree(sequences: torch.Tensor, group) -> None:
    """Every rank of the model must return the same ids; a mismatch means the ranks were given different inputs."""
    if group is None:
        return
    ids = sequences.detach().long()
    weights = torch.arange(1, ids.numel() + 1, device=ids.device, dtype=torch.long).view_as(ids) % 1_000_003
    digest = torch.stack([(ids * weights).sum(), ids.sum(), torch.tensor(ids.numel(), device=ids.device)]).double()
    if ids.device.type != "cuda":
        digest = digest.cpu()
    low, high = digest.clone(), digest.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise GenerationError(
            "The ranks of this model generated different token ids. Every rank of a model-parallel group must "
            "call generate() with the same inputs and generation settings (same prompts, same kwargs)."
        )
