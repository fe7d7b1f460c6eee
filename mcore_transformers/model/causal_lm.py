"""MCoreModelForCausalLM: a Megatron-Core model behind the transformers causal-LM interface."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, Union

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
from transformers.utils import logging

from ..architectures import DecoderArchitecture, get_architecture
from .building import build_model
from ..conversion.binding import BoundParam
from ..conversion.exporter import PlannedTensor, UnclaimedTensors
from ..conversion.loader import check_materialised
from ..conversion.rules import ShardLayout
from .forward import (
    ForwardInputs, StreamEdits, attention_mask_for, broadcast_from_last_stage, forward_logits, packed_segments, rotary_angles,
)
from ..errors import GenerationError, MCoreTransformersError
from .cache import MCoreKVCache
from .export import HFExportMixin
from .generation import MCoreGenerationMixin, cache_argument, with_cache
from ..conversion.hub import resolve_checkpoint
from .loading import load_weights
from .hidden_states import Backbone, as_transformers_hidden_states, recording_hidden_states
from .lockstep import model_parallel_group, ranks_agree
from .pretrained_options import interpret, update_config
from .router_aux import recording_router_logits, router_aux_outputs
from .token_statistics import STATISTICS, FusedHeadOutput, fused_head_output, shifted_targets, token_statistics
from .recompute import disable_recompute, enable_recompute, recompute_enabled
from .vocab import VocabView, input_name, output_name, resize_vocabulary
from ..peft.targets import attach as attach_lora_targets
from ..runtime.parallel import DEFAULT_SEED, ParallelConfig, default_device, init_parallel_state

logger = logging.get_logger(__name__)



def _resolve_dtype(dtype, config: PretrainedConfig) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype}: use torch.float32, torch.bfloat16 or torch.float16.")
    return dtype


class MCoreModelForCausalLM(HFExportMixin, PreTrainedModel, MCoreGenerationMixin):
    """A causal LM whose layers are megatron-core modules, sharded by tp / pp / vpp on this rank.

    Build it with `from_pretrained`; `forward`, `save_pretrained` and `export_hf_weights` follow
    transformers' conventions and are collective across the ranks of the model.
    """

    config_class = PretrainedConfig
    base_model_prefix = "mcore"
    main_input_name = "input_ids"
    _supports_cache_class = False
    _no_split_modules: list = []
    supports_gradient_checkpointing = True

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
        self.source_variant: Optional[str] = None  # transformers' weight-file variant (model.<variant>.safetensors)
        self._bound = bound
        self._plan: Optional[list[PlannedTensor]] = None
        self._plan_dtype: Optional[torch.dtype] = None
        tables, _ = arch.rotary_tables()  # more than one: per layer type (the builder gave each layer its columns)
        self.register_buffer("rotary_inv_freq", tables[0], persistent=False)
        self.rotary_table_count = len(tables)
        for index, table in enumerate(tables[1:], 1):
            self.register_buffer(f"rotary_inv_freq_{index}", table, persistent=False)
        long_rope = arch.long_rope()
        self.rotary_switch_length = long_rope[0] if long_rope is not None else None
        self.register_buffer("rotary_inv_freq_long", long_rope[1] if long_rope is not None else None, persistent=False)
        # Full-vocabulary views, registered so that code looking for them among the model's modules finds them
        # (peft's "all-linear" excludes the head by identity). Not under transformers' names: peft targets
        # by name, and these are views, not layers it could adapt (LoRA targets are the decoder's linears).
        self.embed_tokens_view = VocabView(self, input_name(self), source_stage=0, multiplier=arch.embedding_multiplier())
        head = output_name(self)
        if head is not None:
            self.lm_head_view = VocabView(self, head, source_stage=0 if head == input_name(self) else -1)
        self.post_init()

    @property
    def language_config(self) -> PretrainedConfig:
        """The decoder's config: `config` itself, or a multimodal model's `text_config` (transformers' rule)."""
        return self.config.get_text_config(decoder=True)

    # ---- transformers hooks --------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        """Weights come from the checkpoint: megatron modules are never re-initialised. Only the plain
        nn.Embedding / nn.Linear that transformers' resize helpers build get transformers' initialisation."""
        if type(module) in (nn.Embedding, nn.Linear):
            PreTrainedModel._init_weights(self, module)

    def init_weights(self) -> None:  # transformers calls this from post_init
        """No-op: see `_init_weights`."""

    def tie_weights(self, *args, **kwargs) -> None:
        """Nothing to do: megatron-core ties the embedding and the LM head itself (a shared weight, or a copy
        on the last pipeline stage that megatron keeps in sync); `resize_token_embeddings` keeps them tied."""

    # ---- the vocabulary, as transformers scripts see it (model/vocab.py) ----------------------------
    def get_input_embeddings(self) -> VocabView:
        """The full-vocabulary embedding (every rank): `weight` is the whole matrix, writes reach the shards."""
        return self.embed_tokens_view

    def get_output_embeddings(self) -> Optional[VocabView]:
        """The LM head as a full-vocabulary view (the embedding's rows when tied), like `get_input_embeddings`."""
        return self._modules.get("lm_head_view")

    @property
    def base_model(self) -> Backbone:
        """The decoder without the LM head, as transformers' backbone (`last_hidden_state`; tp = pp = 1)."""
        return Backbone(self)

    def set_input_embeddings(self, value: nn.Module) -> None:
        raise MCoreTransformersError(
            "set_input_embeddings cannot replace megatron-core's sharded embedding. Resize it with "
            "resize_token_embeddings(n), or write rows through get_input_embeddings().weight[ids] = rows."
        )

    def set_output_embeddings(self, value: nn.Module) -> None:
        raise MCoreTransformersError(
            "set_output_embeddings cannot replace megatron-core's sharded LM head. Resize it with "
            "resize_token_embeddings(n), or write rows through get_output_embeddings().weight[ids] = rows."
        )

    def resize_token_embeddings(
        self, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None, mean_resizing: bool = True
    ) -> VocabView:
        """transformers' resize across tp / pp (collective): new rows drawn as transformers draws them, tied
        weights kept tied, `config.vocab_size` updated; saves and exports follow the new size."""
        if new_num_tokens is None and pad_to_multiple_of is None:
            return self.get_input_embeddings()
        self.vocab_size = resize_vocabulary(self, new_num_tokens, pad_to_multiple_of, mean_resizing)
        return self.get_input_embeddings()

    def enable_input_require_grads(self) -> None:
        """Make the embedding output require grad (gradient checkpointing with frozen embeddings, e.g. PEFT)."""
        self.disable_input_require_grads()
        hooks = []
        for chunk in self.chunks:
            chunk = getattr(chunk, "module", chunk)
            if chunk.pre_process:
                hooks.append(chunk.embedding.register_forward_hook(lambda module, args, output: output.requires_grad_(True)))
        self._input_require_grads_hooks = hooks

    def disable_input_require_grads(self) -> None:
        for hook in getattr(self, "_input_require_grads_hooks", []):
            hook.remove()
        self._input_require_grads_hooks = []

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """transformers' activation checkpointing → megatron-core full-layer recompute."""
        enable_recompute(self, activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        disable_recompute(self)

    @property
    def is_activation_checkpointing(self) -> bool:
        return recompute_enabled(self)

    # transformers before 5.24 (and its Trainer) say "gradient checkpointing"; 5.24 keeps them as deprecated aliases.
    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """transformers' gradient checkpointing → megatron-core full-layer recompute."""
        enable_recompute(self, gradient_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        disable_recompute(self)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return recompute_enabled(self)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        *model_args,
        tp: Optional[int] = None,
        pp: Optional[int] = None,
        vpp: Optional[int] = None,
        cp: Optional[int] = None,
        ep: Optional[int] = None,
        etp: Optional[int] = None,
        sequence_parallel: Optional[bool] = None,
        dtype: Union[str, torch.dtype, None] = None,
        torch_dtype: Union[str, torch.dtype, None] = None,
        seed: int = DEFAULT_SEED,
        **kwargs,
    ) -> "MCoreModelForCausalLM":
        """Load an HF checkpoint (folder or hub id) into megatron-core modules laid out by tp/pp/vpp/ep.

        Sizes not given come from MCORE_TRANSFORMERS_TP / _PP / _EP / ... (else 1), so a transformers script
        runs sharded under torchrun unchanged. Takes what transformers' `from_pretrained` takes (`config=`, `revision`, `token`, `cache_dir`,
        `subfolder`, `variant`, `output_loading_info`, config attributes as keywords, ...): see
        `model.pretrained_options` for what each means here and which are refused (quantisation, layer
        placement by `device_map`, TF/Flax weights). Initialises torch.distributed (from torchrun's
        environment, or a world of one) and Megatron's parallel state when they are not up yet. Each rank
        reads only the bytes of its own shards.
        """
        if model_args:
            raise TypeError(
                f"from_pretrained got {len(model_args)} positional argument(s) after the model path; pass options by keyword."
            )
        options = interpret(kwargs, default_device().type)
        layout = ParallelConfig.with_environment(
            tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp, sequence_parallel=sequence_parallel
        )
        folder = resolve_checkpoint(str(pretrained_model_name_or_path), subfolder=options.subfolder, **options.hub)
        config = options.config or AutoConfig.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
        update_config(config, options.config_updates)
        for note in options.notes:
            logger.info(f"from_pretrained: {note}.")
        arch = cls._architecture(config, folder, options.variant)
        dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, config)

        init_parallel_state(layout, seed=seed)
        built = cls._build(arch, layout, dtype)
        bound = load_weights(folder, arch, built, dtype, default_device(), options.variant)
        check_materialised(built.chunks)
        model = cls(config, arch, built.chunks, built.shard_layout, layout, bound, source_folder=folder)
        model.source_variant = options.variant
        if options.generation_config is not None:
            model.generation_config = options.generation_config
        elif os.path.exists(os.path.join(folder, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(folder)
        model.to(default_device())
        model.eval()
        attach_lora_targets(model)  # the HF-named view peft targets: model.layers.N.self_attn.q_proj, ...
        if options.output_loading_info:
            unused = UnclaimedTensors(folder, model.export_plan(), options.variant)
            unused.close()
            info = {"missing_keys": [], "unexpected_keys": list(unused.names), "mismatched_keys": [], "error_msgs": []}
            return model, info
        return model

    @classmethod
    def _architecture(cls, config: PretrainedConfig, folder: str, variant: Optional[str]) -> DecoderArchitecture:
        """The architecture of the checkpoint in `folder` (a multimodal model looks at its tensor names)."""
        return get_architecture(config)

    @classmethod
    def _build(cls, arch: DecoderArchitecture, layout: ParallelConfig, dtype: torch.dtype):
        """This rank's modules, parameters on the meta device (a multimodal model adds its encoders)."""
        return build_model(arch, layout, dtype)

    # ---- forward -------------------------------------------------------------------------------
    def rotary_frequencies(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotary inverse frequencies of a forward over `positions`: the long set (longrope) once the largest
        position reaches past the switch length, chosen on the device like transformers (no host sync)."""
        if self.rotary_inv_freq_long is None:
            return self.rotary_inv_freq
        longer = positions.max().to(self.rotary_inv_freq.device) + 1 > self.rotary_switch_length
        return torch.where(longer, self.rotary_inv_freq_long, self.rotary_inv_freq)

    def rotary_angles_for(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotary angles of a forward over `positions` (`[past + s, b, 1, width]`): one block of columns per
        rotary table, in table order, each layer rotating by its own (`RotaryCachedSelfAttention.rotary_columns`)."""
        arch = self.arch
        tables = [self.rotary_frequencies(positions)]
        tables += [getattr(self, f"rotary_inv_freq_{index}") for index in range(1, self.rotary_table_count)]
        angles = [rotary_angles(positions, table, arch.rotary_interleaved(), arch.rotary_components()) for table in tables]
        return angles[0] if len(angles) == 1 else torch.cat(angles, -1)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[MCoreKVCache] = None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        cache_position: Optional[torch.LongTensor] = None,
        return_dict: Optional[bool] = None,
        cache: Optional[MCoreKVCache] = None,
        output_hidden_states: Optional[bool] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """HF causal-LM forward: full-vocab logits on every rank; loss shifted inside, -100 ignored.

        With a KV cache (an `MCoreKVCache`, which `generate` builds; passed as `cache`, transformers 5.24's
        name, or `past_key_values`) the tokens are appended to the cache: `attention_mask` then covers the cached tokens and these (HF's convention) and
        `position_ids` default to the positions after the cached ones. `use_cache=True` without a cache
        starts one. `logits_to_keep` (int: the last n positions, 0 = all; or 1-D indices) limits the
        positions whose logits are computed. `output_hidden_states` returns transformers' `hidden_states` tuple
        (pp = 1). Under tp / pp every rank must pass the same inputs; different ones are refused.
        """
        if inputs_embeds is not None:
            raise NotImplementedError("inputs_embeds is not supported: pass input_ids.")
        return self._language_model_forward(
            input_ids, attention_mask, position_ids, cache_argument(past_key_values, cache), use_cache, labels,
            logits_to_keep, cache_position, output_hidden_states, **kwargs,
        )

    def _language_model_forward(
        self,
        input_ids: Optional[torch.LongTensor],
        attention_mask: Optional[torch.Tensor],
        position_ids: Optional[torch.LongTensor],
        cache: Optional[MCoreKVCache],
        use_cache: Optional[bool],
        labels: Optional[torch.LongTensor],
        logits_to_keep: Union[int, torch.Tensor],
        cache_position: Optional[torch.LongTensor],
        output_hidden_states: Optional[bool],
        stream_edits: Optional[Callable[[int], StreamEdits]] = None,
        **kwargs,
    ):
        """The decoder's forward (see `forward`). `position_ids` may be `[3, b, s]` (multimodal rotary);
        `stream_edits(padded_seq)` gives what another modality adds to the decoder's stream (`StreamEdits`)."""
        if input_ids is None:
            raise ValueError("input_ids is required.")
        fused_head = kwargs.pop("fused_lm_head", False)
        shift_labels = kwargs.pop("shift_labels", None)
        if fused_head:
            if labels is None and shift_labels is None:
                raise ValueError("fused_lm_head=True scores the labels: pass labels (or shift_labels).")
            use_cache, logits_to_keep = False, 0
        device = self.rotary_inv_freq.device
        input_ids = input_ids.to(device)
        batch, seq = input_ids.shape
        if self._generate_cache is None and not ranks_agree(input_ids, model_parallel_group()):
            raise MCoreTransformersError(
                f"The ranks of this model (tp={self.layout.tp}, pp={self.layout.pp}) got different input_ids. Every rank "
                "of a tensor / pipeline-parallel group must run the model on the same batch. transformers.Trainer and "
                "TRL's trainers hand each process its own batch: under tp / pp > 1 train with MCoreTrainer (or the "
                "trainers in mcore_transformers.trl), which give the ranks of one model the same data."
            )

        self.check_received_cache(cache)
        if cache is None and use_cache and not self.training:
            cache = self.new_kv_cache(batch, seq)
        past = cache.get_seq_length() if cache is not None else 0
        if cache_position is not None and cache_position.numel() and int(cache_position.reshape(-1)[0]) != past:
            raise GenerationError(
                f"cache_position starts at {int(cache_position.reshape(-1)[0])} but the KV cache holds {past} tokens: "
                "pass the cache these positions continue (or no cache_position)."
            )
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            if attention_mask.shape != (batch, past + seq):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but must be [batch, cached + new tokens] "
                    f"= [{batch}, {past} + {seq}]: with a KV cache it covers the cached tokens too, as in transformers."
                )
        # transformers' packed sequences: position ids that restart, no attention mask, no cache (transformers
        # makes one when use_cache, or else config.use_cache, is true: packing is not looked for then).
        wants_cache = use_cache if use_cache is not None else getattr(self.config, "use_cache", False)
        packing_possible = (
            position_ids is not None and position_ids.dim() == 2 and attention_mask is None and cache is None
            and not wants_cache
        )
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=device).expand(batch, seq)
        position_ids = position_ids.to(device)
        if position_ids.shape[-2] == 1 and batch > 1:
            position_ids = position_ids.expand(*position_ids.shape[:-2], batch, seq)

        # Sequence parallelism splits the sequence across TP ranks: pad it to a multiple of tp
        # with masked positions on the right (invisible to every real token under causal masking;
        # in a KV cache they sit beyond the cached length, overwritten by the next step).
        sequence_parallel = self.layout.sequence_parallel
        padded_seq = seq
        if sequence_parallel and seq % self.layout.tp:
            padded_seq = -(-seq // self.layout.tp) * self.layout.tp
            extra = padded_seq - seq
            input_ids = nn.functional.pad(input_ids, (0, extra))
            position_ids = torch.cat([position_ids, position_ids[..., -1:] + torch.arange(1, extra + 1, device=device)], -1)
            if attention_mask is None:
                attention_mask = torch.ones(batch, past + seq, dtype=torch.long, device=device)
            attention_mask = nn.functional.pad(attention_mask, (0, extra))

        # Which positions get logits (generate asks for the last one only).
        if isinstance(logits_to_keep, torch.Tensor):
            keep, kept = logits_to_keep.to(device).reshape(-1).long(), logits_to_keep.numel()
        elif 0 < logits_to_keep < seq:
            keep, kept = slice(seq - logits_to_keep, seq), logits_to_keep
        else:
            keep, kept = None, seq

        # transformers' MoE load-balancing loss (config.output_router_logits): routers' logits recorded.
        output_router_logits = kwargs.pop("output_router_logits", None)
        if output_router_logits is None:
            output_router_logits = getattr(self.language_config, "output_router_logits", False)
        aux_spec = self.arch.router_aux_loss() if output_router_logits else None
        recording = recording_router_logits(self.chunks) if aux_spec is not None else contextlib.nullcontext([])
        hidden_recording = contextlib.nullcontext(None)
        if output_hidden_states if output_hidden_states is not None else self.language_config.output_hidden_states:
            hidden_recording = recording_hidden_states(self.chunks, self.layout.pp)

        rotary_positions = cache.begin_step(position_ids) if cache is not None else position_ids
        packed = packed_segments(position_ids) if packing_possible else None
        edits = stream_edits(padded_seq) if stream_edits is not None else StreamEdits()
        inputs = ForwardInputs(
            input_ids=input_ids,
            attention_mask=attention_mask_for(
                attention_mask, batch, padded_seq, self.arch.sliding_window(), device, past=past, segments=packed
            ),
            rotary=self.rotary_angles_for(rotary_positions),
            inference_context=cache.context if cache is not None else None,
            # Under sequence parallelism the output layer gathers the sequence itself: cut afterwards.
            keep=None if sequence_parallel else keep,
            edits=edits,
        )
        hidden_seq = padded_seq // self.layout.tp if sequence_parallel else padded_seq
        hidden_shape = (hidden_seq, batch, self.language_config.hidden_size)
        cut_after = sequence_parallel or keep is None  # else run_chunk computed only the kept positions
        logits_seq = padded_seq if cut_after else kept
        with recording as router_logits, hidden_recording as recorded_hidden:
            if fused_head:
                targets = shift_labels if shift_labels is not None else shifted_targets(labels)
                output = self._fused_head(inputs, hidden_shape, targets.to(device), seq, kwargs.pop("num_items_in_batch", None))
                if shift_labels is None:  # position s - 1 predicts nothing
                    output = FusedHeadOutput(**{k: v[:, :-1] if v.dim() == 2 else v for k, v in output.items()})
            elif self.layout.pp > 1:
                # Pipeline stages run here for inference and evaluation; training under pp goes through
                # megatron's pipeline schedule (MCoreTrainer), which owns the backward pass.
                with torch.no_grad():
                    logits = forward_logits(self.chunks, inputs, hidden_shape, self.dtype)
                    logits = broadcast_from_last_stage(
                        logits, (logits_seq, batch, self.shard_layout.padded_vocab_size), self.dtype, device
                    )
            else:
                logits = forward_logits(self.chunks, inputs, hidden_shape, self.dtype)
        if fused_head:
            if aux_spec is not None:
                output.aux_loss, _ = router_aux_outputs(self.layout, aux_spec, router_logits, attention_mask, batch)
                output.loss = output.loss + aux_spec[2] * output.aux_loss
            return output
        if cache is not None:
            cache.end_step(seq)
        logits = logits.transpose(0, 1)[:, :, : self.language_config.vocab_size]
        if cut_after:
            logits = logits[:, :seq]
            if keep is not None:
                logits = logits[:, keep]
        logits = logits.contiguous()

        hidden_states = None
        if recorded_hidden is not None:
            hidden_states = as_transformers_hidden_states(recorded_hidden, sequence_parallel, seq)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels.to(device), vocab_size=self.language_config.vocab_size, **kwargs)
        if aux_spec is None:
            return with_cache(CausalLMOutputWithPast, cache, loss=loss, logits=logits, hidden_states=hidden_states)
        new_tokens_mask = attention_mask[:, past:] if attention_mask is not None else None  # padded like the input
        aux_loss, routers = router_aux_outputs(self.layout, aux_spec, router_logits, new_tokens_mask, batch)
        if loss is not None:
            loss = loss + aux_spec[2] * aux_loss.to(loss.device)
        return with_cache(
            MoeCausalLMOutputWithPast, cache, loss=loss, aux_loss=aux_loss, logits=logits, router_logits=routers,
            hidden_states=hidden_states,
        )

    # TRL's fused LM head (`fused_lm_head=True`) divides the logits by this (its `temperature`: GRPO sets it)
    fused_head_temperature: float = 1.0

    def _fused_head(self, inputs: ForwardInputs, hidden_shape, targets: torch.Tensor, seq: int, num_items_in_batch):
        """TRL's fused LM head: per-token log-probabilities of `targets` [b, s] (and TRL's other statistics) from the
        vocabulary shards, on every rank (token_statistics.py); differentiable at pp = 1."""
        pipelined = self.layout.pp > 1
        with torch.no_grad() if pipelined else contextlib.nullcontext():
            shard = forward_logits(self.chunks, inputs, hidden_shape, self.dtype, gather_vocabulary=False)
            statistics = None
            if shard is not None:
                statistics = token_statistics(
                    shard[:seq], targets, self.language_config.vocab_size, self.fused_head_temperature
                )
            if pipelined:
                stacked = torch.stack([statistics[name].float() for name in STATISTICS]) if statistics is not None else None
                stacked = broadcast_from_last_stage(stacked, (len(STATISTICS), *targets.shape), torch.float32, targets.device)
                statistics = dict(zip(STATISTICS, stacked))
                statistics["is_top1"] = statistics["is_top1"].bool()
        return fused_head_output(statistics, targets, num_items_in_batch)

    # ---- what a training step asks of the model (training/step.py) ----------------------------------
    extra_inputs: tuple[str, ...] = ()  # batch keys it takes beyond input_ids, labels, attention_mask, position_ids

    def micro_batches(self, batch: dict, parts: int) -> list[dict]:
        """`batch` cut into `parts` equal row slices (the pipeline schedule's micro-batches)."""
        rows = batch["input_ids"].shape[0]
        if rows % parts:
            raise MCoreTransformersError(f"A batch of {rows} rows cannot be cut into {parts} equal micro-batches.")
        size = rows // parts
        return [{key: value[i * size : (i + 1) * size] for key, value in batch.items()} for i in range(parts)]

    def step_inputs(self, batch: dict, first_chunk: bool) -> tuple[torch.Tensor, StreamEdits]:
        """A training micro-batch's rotary positions, and what other modalities add to its stream (on the chunk
        that embeds, `first_chunk`)."""
        positions = batch.get("position_ids")
        if positions is None:
            rows, seq = batch["input_ids"].shape
            positions = torch.arange(seq, device=batch["input_ids"].device).expand(rows, seq)
        return positions, StreamEdits()

    # ---- generation ----------------------------------------------------------------------------
    def new_kv_cache(self, batch_size: int, max_length: int) -> MCoreKVCache:
        """An empty KV cache for `batch_size` rows and `max_length` tokens (it grows if a forward needs more).

        Under sequence parallelism a step is padded up to a multiple of tp, hence the tp - 1 spare slots.
        """
        layer_numbers = [layer.layer_number for chunk in self.chunks for layer in chunk.decoder.layers]
        components = 1 if self.arch.rotary_components() is None else 3
        return MCoreKVCache(
            batch_size, max_length + self._cache_spare(), self.rotary_inv_freq.device, layer_numbers, components
        )

    def kv_cache_bytes(self, batch_size: int, max_length: int) -> int:
        """Bytes of key + value memory this rank's attention layers allocate for such a cache."""
        element = torch.tensor([], dtype=self.dtype).element_size()
        total = 0
        for chunk in self.chunks:
            for layer in chunk.decoder.layers:
                attention = layer.self_attention
                per_token = attention.num_query_groups_per_partition * (attention.key_hidden_size + attention.val_hidden_size)
                total += per_token * batch_size * (max_length + self._cache_spare()) * element
        return total

    def _cache_spare(self) -> int:
        return self.layout.tp - 1 if self.layout.sequence_parallel else 0
