"""MCoreModelForCausalLM: a Megatron-Core model behind the transformers causal-LM interface."""

from __future__ import annotations

import math
import os
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from .architectures import DecoderArchitecture, get_architecture
from .building import build_model
from .conversion.binding import BoundParam, bind_parameters
from .conversion.exporter import PlannedTensor, export_plan, iter_hf_tensors
from .conversion.loader import check_checkpoint, check_materialised, load_parameters
from .conversion.reader import CheckpointReader
from .conversion.rules import ShardLayout
from .conversion.writer import check_save_target, write_hf_folder
from .architectures.base import TE_FUSED_NORM_NAMES
from .forward import ForwardInputs, attention_mask_for, broadcast_from_last_stage, forward_logits, rotary_angles
from .hub import resolve_checkpoint
from .runtime.parallel import DEFAULT_SEED, ParallelConfig, default_device, init_parallel_state

logger = logging.get_logger(__name__)

# from_pretrained kwargs transformers users pass that have no meaning here (ignored with a note).
IGNORED_KWARGS = {"trust_remote_code", "low_cpu_mem_usage", "attn_implementation", "use_safetensors", "device_map"}


def _resolve_dtype(dtype, config: PretrainedConfig) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype}: use torch.float32, torch.bfloat16 or torch.float16.")
    return dtype


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class MCoreModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose layers are megatron-core modules, sharded by tp / pp / vpp on this rank.

    Build it with `from_pretrained`; `forward`, `save_pretrained` and `export_hf_weights` follow
    transformers' conventions and are collective across the ranks of the model.
    """

    config_class = PretrainedConfig
    base_model_prefix = "mcore"
    main_input_name = "input_ids"
    _supports_cache_class = False
    _no_split_modules: list = []

    def __init__(
        self,
        config: PretrainedConfig,
        arch: DecoderArchitecture,
        chunks: list[nn.Module],
        shard_layout: ShardLayout,
        layout: ParallelConfig,
        bound: list[BoundParam],
        source_folder: Optional[str] = None,
    ):
        super().__init__(config)
        self.chunks = nn.ModuleList(chunks)
        self.arch = arch
        self.layout = layout
        self.shard_layout = shard_layout
        self.source_folder = source_folder
        self._bound = bound
        self._plan: Optional[list[PlannedTensor]] = None
        self.register_buffer("rotary_inv_freq", arch.rope(), persistent=False)
        self.post_init()

    # ---- transformers hooks --------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        """Weights come from the checkpoint; transformers' re-initialisation must not touch them."""

    def init_weights(self) -> None:  # transformers calls this from post_init
        """No-op: see `_init_weights`."""

    def get_input_embeddings(self) -> Optional[nn.Module]:
        first = self.chunks[0]
        return first.embedding.word_embeddings if first.pre_process else None

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        *,
        tp: int = 1,
        pp: int = 1,
        vpp: Optional[int] = None,
        cp: int = 1,
        ep: int = 1,
        etp: Optional[int] = None,
        sequence_parallel: bool = False,
        dtype: Union[str, torch.dtype, None] = None,
        torch_dtype: Union[str, torch.dtype, None] = None,
        revision: Optional[str] = None,
        token: Union[str, bool, None] = None,
        cache_dir: Optional[str] = None,
        local_files_only: bool = False,
        seed: int = DEFAULT_SEED,
        **kwargs,
    ) -> "MCoreModelForCausalLM":
        """Load an HF checkpoint (folder or hub id) into megatron-core modules laid out by tp/pp/vpp/ep.

        Initialises torch.distributed (from torchrun's environment, or a world of one) and Megatron's
        parallel state when they are not up yet. Each rank reads only the bytes of its own shards.
        """
        unknown = set(kwargs) - IGNORED_KWARGS
        if unknown:
            raise TypeError(f"from_pretrained got unsupported arguments: {sorted(unknown)}")
        if kwargs:
            logger.info(f"Ignoring {sorted(kwargs)}: megatron-core decides placement and attention kernels.")
        layout = ParallelConfig(tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp, sequence_parallel=sequence_parallel)
        folder = resolve_checkpoint(
            str(pretrained_model_name_or_path), revision=revision, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        config = AutoConfig.from_pretrained(folder)
        arch = get_architecture(config)
        dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, config)

        init_parallel_state(layout, seed=seed)
        built = build_model(arch, layout, dtype)
        renames = TE_FUSED_NORM_NAMES if built.uses_transformer_engine else {}
        bound = bind_parameters(built.chunks, arch.rules(), renames)
        with CheckpointReader(folder) as reader:
            check_checkpoint(bound, reader, built.shard_layout)
            load_parameters(bound, reader, built.shard_layout, dtype, default_device(), show_progress=_is_rank0())
        check_materialised(built.chunks)
        model = cls(config, arch, built.chunks, built.shard_layout, layout, bound, source_folder=folder)
        if os.path.exists(os.path.join(folder, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(folder)
        model.to(default_device())
        model.eval()
        return model

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """HF causal-LM forward: full-vocab logits on every rank; loss shifted inside, -100 ignored."""
        if inputs_embeds is not None:
            raise NotImplementedError("inputs_embeds is not supported: pass input_ids.")
        if input_ids is None:
            raise ValueError("input_ids is required.")
        device = self.rotary_inv_freq.device
        input_ids = input_ids.to(device)
        batch, seq = input_ids.shape
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        if position_ids is None:
            position_ids = torch.arange(seq, device=device).expand(batch, seq)
        position_ids = position_ids.to(device)

        # Sequence parallelism splits the sequence across TP ranks: pad it to a multiple of tp
        # with masked positions on the right (invisible to every real token under causal masking).
        padded_seq = seq
        if self.layout.sequence_parallel and seq % self.layout.tp:
            padded_seq = -(-seq // self.layout.tp) * self.layout.tp
            extra = padded_seq - seq
            input_ids = nn.functional.pad(input_ids, (0, extra))
            position_ids = torch.cat([position_ids, position_ids[:, -1:] + torch.arange(1, extra + 1, device=device)], 1)
            if attention_mask is None:
                attention_mask = torch.ones(batch, seq, dtype=torch.long, device=device)
            attention_mask = nn.functional.pad(attention_mask, (0, extra))

        inputs = ForwardInputs(
            input_ids=input_ids,
            attention_mask=attention_mask_for(attention_mask, batch, padded_seq, self.arch.sliding_window(), device),
            rotary=rotary_angles(position_ids, self.rotary_inv_freq),
        )
        hidden_seq = padded_seq // self.layout.tp if self.layout.sequence_parallel else padded_seq
        hidden_shape = (hidden_seq, batch, self.config.hidden_size)
        if self.layout.pp > 1:
            # Pipeline stages run here for inference and evaluation; training under pp goes through
            # megatron's pipeline schedule (MCoreTrainer), which owns the backward pass.
            with torch.no_grad():
                logits = forward_logits(self.chunks, inputs, hidden_shape, self.dtype)
                logits = broadcast_from_last_stage(
                    logits, (padded_seq, batch, self.shard_layout.padded_vocab_size), self.dtype, device
                )
        else:
            logits = forward_logits(self.chunks, inputs, hidden_shape, self.dtype)
        logits = logits.transpose(0, 1)[:, :seq, : self.config.vocab_size].contiguous()

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels.to(device), vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # ---- export --------------------------------------------------------------------------------
    def export_plan(self) -> list[PlannedTensor]:
        """Names, shapes and dtypes of every HF tensor this model exports (collective the first time)."""
        if self._plan is None:
            self._plan = export_plan(self._bound, self.shard_layout)
        return self._plan

    def export_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective: yield (HF name, full tensor) on every rank, in checkpoint order."""
        yield from iter_hf_tensors(self._bound, self.shard_layout, self.export_plan(), to="all")

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Global parameter count of the HF model (every shard, once; no vocab padding)."""
        total = 0
        for entry in self.export_plan():
            for name, shape in zip(entry.names, entry.shapes):
                if exclude_embeddings and ("embed_tokens" in name or "lm_head" in name):
                    continue
                total += math.prod(shape)
        if only_trainable and not all(p.requires_grad for p in self.parameters()):
            local = sum(p.numel() for p in self.parameters() if p.requires_grad)
            if dist.is_initialized() and dist.get_world_size() > 1:
                count = torch.tensor([local], dtype=torch.float64)
                dist.all_reduce(count, group=ps.get_model_parallel_group())
                local = int(count.item())
            return local
        return total

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        max_shard_size: Union[int, str] = "5GB",
        **kwargs,
    ) -> None:
        """Collective: write an HF folder (safetensors shards + index, source config/tokenizer verbatim).

        Only global rank 0 writes; the folder appears atomically (written beside it, then renamed).
        """
        target = str(save_directory)
        error = [None]
        if _is_rank0():
            try:
                check_save_target(target)
            except Exception as err:  # re-raised on every rank below, before any collective
                error = [err]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise error[0]

        plan = self.export_plan()
        stream = iter_hf_tensors(self._bound, self.shard_layout, plan, to="rank0")
        if _is_rank0():
            specs = [(n, s, e.dtype) for e in plan for n, s in zip(e.names, e.shapes)]
            progress = tqdm(stream, total=len(specs), desc="Saving", unit="tensor")
            write_hf_folder(target, progress, specs, max_shard_size, self.source_folder, self.config.save_pretrained)
        else:
            for _ in stream:
                pass
        if dist.is_initialized():
            dist.barrier()
