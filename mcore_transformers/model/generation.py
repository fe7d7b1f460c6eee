"""transformers' `generate` on a megatron-core model: the model owns its KV cache, the ranks step in lockstep.

`MCoreGenerationMixin` is the one place that touches `GenerationMixin`'s private hooks and knows how the
supported transformers releases name the cache. Checked against transformers 5.19.0, 5.23.0 and 5.24.0
(the tested range, `mcore_transformers/versions.py`); the compatibility tests run at both ends of it.

- The cache's name: 5.19–5.23 hand it to `forward` and read it from the output as `past_key_values`;
  5.24 renamed both to `cache` (the old name still works there, with a deprecation warning).
  `CACHE_KWARG` / `CACHE_FIELD` are probed from transformers itself, not from its version number.
- `_supports_default_dynamic_cache` → False: generate must not build a DynamicCache.
- `_prepare_cache_for_generation` (same signature over the range): builds an `MCoreKVCache` (a public
  `Cache` subclass) for every row generate will run, after checking it fits in memory.
- `_validate_generated_length`: refuses prompts longer than `max_position_embeddings`.

Everything else is transformers' public contract: generate slices the prompt by `cache.get_seq_length()`,
passes the cache back every step, and calls `reorder_cache` / `crop` on it. A cache the model cannot trust
raises (`check_received_cache`): a release that stopped passing generate's cache to `forward` would
otherwise decode every step without context and return wrong tokens silently.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Optional

import torch
import torch.distributed as dist
import transformers
from transformers import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from ..errors import GenerationError
from ..runtime.parallel import is_rank0
from .cache import MCoreKVCache
from .lockstep import model_parallel_group, ranks_agree, sampling_in_lockstep

logger = logging.get_logger(__name__)

# The keyword generate passes the cache to forward under, and the output field it reads it back from.
CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def cache_argument(past_key_values, cache):
    """The cache a forward was given, under either name (transformers 5.24 says `cache`, earlier releases `past_key_values`)."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise GenerationError("forward got both `past_key_values` and `cache`: pass the KV cache once.")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, MCoreKVCache):
        raise GenerationError(
            f"The KV cache must be an MCoreKVCache (got {type(cache).__name__}): megatron-core keeps the keys and "
            "values in its own inference context. Let generate() build it, or use model.new_kv_cache()."
        )
    return cache


def with_cache(output_class, cache, **fields):
    """`output_class(**fields)` with the cache in the field this transformers release declares."""
    return output_class(**fields, **{CACHE_FIELD: cache})


class MCoreGenerationMixin(GenerationMixin):
    """transformers' `generate` for a model that owns its KV cache (an `MCoreKVCache`) and spans several ranks.

    The host class provides `new_kv_cache(rows, length)`, `kv_cache_bytes(rows, length)`, `layout` and `device`.
    """

    _generate_cache: Optional[MCoreKVCache] = None  # the cache of the generate() running now

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """transformers must not build a DynamicCache: the model owns its cache (an MCoreKVCache)."""
        return False

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit is not None and input_ids_length > limit:
            raise GenerationError(
                f"The prompt has {input_ids_length} tokens but the model was trained for at most "
                f"max_position_embeddings={limit}. Shorten (or truncate) the prompt to {limit} tokens or fewer."
            )
        if limit is not None and generation_config.max_length > limit:
            logger.warning_once(
                f"Generating up to {generation_config.max_length} tokens, beyond max_position_embeddings={limit}: "
                "positions past the trained range (transformers generates them the same way)."
            )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        """Reserve an MCoreKVCache for every row generate will run (prompts × beams / return sequences).

        A cache passed in (`past_key_values=` / `cache=`) is used as it is (grown if too short); none is made
        when `use_cache=False`. A cache that would not fit in free memory is refused before any work starts.
        """
        rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        cache = model_kwargs.get(CACHE_KWARG)
        if cache is not None:
            if not isinstance(cache, MCoreKVCache):
                raise GenerationError(
                    f"past_key_values must be an MCoreKVCache (got {type(cache).__name__}); build one with "
                    "model.new_kv_cache(batch_size, max_length) or let generate() build it."
                )
            if cache.batch_size != rows:
                raise GenerationError(
                    f"The KV cache passed in holds {cache.batch_size} rows but this generate() runs {rows} "
                    f"({batch_size} prompt(s) × {rows // batch_size} beam(s)/return sequence(s)). Pass a cache "
                    "with that many rows, or none."
                )
            cache._is_user_defined = True
            cache.reserve(max_cache_length)
        elif generation_config.use_cache is not False:
            check_cache_fits(
                self.kv_cache_bytes(rows, max_cache_length), batch_size, rows, max_cache_length, self.device,
                model_parallel_group(),
            )
            cache = model_kwargs[CACHE_KWARG] = self.new_kv_cache(rows, max_cache_length)
        self._generate_cache = cache

    def check_received_cache(self, cache: Optional[MCoreKVCache]) -> None:
        """Inside generate(), forward must get generate's cache: refuse to decode without it."""
        expected = self._generate_cache
        if expected is not None and cache is not expected:
            raise GenerationError(
                f"generate() built an MCoreKVCache but forward received {type(cache).__name__ if cache is not None else 'no cache'}: "
                f"transformers {transformers.__version__} passes the cache in a way this release of mcore_transformers "
                "does not know, and decoding without it would return wrong tokens. Use a transformers release of the "
                "tested range (mcore_transformers.versions), or pass use_cache=False."
            )

    def generate(self, *args, **kwargs):
        """transformers' `generate`, collective over the ranks of the model; every rank returns the same ids.

        All ranks of a model-parallel group must pass the same inputs and settings. Sampling draws with
        the random state of the group's first rank (broadcast at the start), so a seed set there gives
        what transformers samples in one process. A `streamer` is fed on global rank 0 only. Under
        expert parallelism the replicas may generate different prompts (same batch shape) for different
        lengths: `synced_gpus` defaults to True so every rank steps until all are done. It runs in eval mode
        (dropout off) and restores the training mode after, also when called mid-training (TRL's GRPO).
        """
        if not is_rank0():
            kwargs.pop("streamer", None)
        if self.layout.ep > 1 and kwargs.get("synced_gpus") is None:
            # Expert-parallel ranks are data-parallel replicas that exchange tokens in every MoE layer:
            # each must keep stepping until every rank's sequences are done (HF's synced_gpus loop).
            kwargs["synced_gpus"] = True
        group = model_parallel_group()
        was_training = self.training
        self.eval()  # megatron's cached inference path is an eval-mode path (RL trainers generate mid-training)
        try:
            with sampling_in_lockstep(group):
                output = super().generate(*args, **kwargs)
        finally:
            self._generate_cache = None
            self.train(was_training)
        if not ranks_agree(output if isinstance(output, torch.Tensor) else output.sequences, group):
            raise GenerationError(
                "The ranks of this model generated different token ids. Every rank of a model-parallel group must "
                "call generate() with the same inputs and generation settings (same prompts, same kwargs)."
            )
        return output


# ---- generate() helpers used by the model ----------------------------------------------------------

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


def check_cache_fits(needed: int, batch_size: int, rows: int, max_length: int, device: torch.device, group) -> None:
    """Refuse (on every rank of `group` together) a cache of `needed` bytes that does not fit in free memory."""
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
