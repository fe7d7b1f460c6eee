"""MCoreModelForImageTextToText: a vision-language model whose language model is megatron-core's, behind
transformers' image-text-to-text interface (what `AutoModelForImageTextToText` gives for Qwen2.5-VL / Qwen3-VL).

The language model is the text engine of `MCoreModelForCausalLM` (every layout: tp, sequence parallelism, pp,
vpp, ep), with multimodal rotary positions. The vision tower is transformers' own module, whole on each rank of
the first pipeline stage (`vision.py`). A forward takes what transformers' processor returns.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import LayoutError
from ..model.building import BuiltModel, build_model
from ..model.cache import MCoreKVCache
from ..model.causal_lm import MCoreModelForCausalLM
from ..model.forward import StreamEdits
from ..model.generation import CACHE_KWARG, cache_argument
from ..model.loading import checkpoint_tensor_names
from ..peft.view import find_view
from ..runtime.parallel import ParallelConfig
from .families import (
    FLAT_VISUAL, NESTED_VISUAL, VisionLanguageArchitecture, checkpoint_is_nested, get_family, language_architecture,
)
from .positions import rope_positions, text_positions, token_types
from .vision import VISION_MODULE, MediaFeatures, build_vision_tower, count_features, encode, stream_edits, vision_rules


class MCoreModelForImageTextToText(MCoreModelForCausalLM):
    """A vision-language model (Qwen2.5-VL, Qwen3-VL) whose language model is sharded by megatron-core.

    Build it with `from_pretrained(path, tp=..., pp=...)`; `forward` takes transformers' processor output
    (`input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`,
    `second_per_grid_ts`, `mm_token_type_ids`) and returns full-vocabulary logits on every rank; `generate`
    and `save_pretrained` work as on the causal LM.
    """

    def __init__(self, config: PretrainedConfig, arch: VisionLanguageArchitecture, *args, **kwargs):
        super().__init__(config, arch, *args, **kwargs)
        self.family = get_family(config)
        self.position_rules = self.family.position_rules(config)
        self.rope_deltas: Optional[torch.Tensor] = None  # the last prompt's, as transformers keeps them

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def _architecture(cls, config: PretrainedConfig, folder: str, variant: Optional[str]) -> VisionLanguageArchitecture:
        get_family(config)  # an unsupported family is refused first
        nested = checkpoint_is_nested(checkpoint_tensor_names(folder, variant))
        tower = build_vision_tower(config.vision_config, torch.float32)  # on the meta device: its names only
        rules = vision_rules(tower, NESTED_VISUAL if nested else FLAT_VISUAL)
        return VisionLanguageArchitecture(language_architecture(config, nested), rules, config)

    @classmethod
    def _build(cls, arch: VisionLanguageArchitecture, layout: ParallelConfig, dtype: torch.dtype) -> BuiltModel:
        config = arch.config
        deepstack = get_family(config).deepstack_layers(config)
        first_chunk_layers = arch.hf.num_hidden_layers // (layout.pp * layout.virtual_stages)
        if deepstack > first_chunk_layers:
            raise LayoutError(
                f"pp·vpp = {layout.pp * layout.virtual_stages} leaves {first_chunk_layers} decoder layer(s) on the first "
                f"stage, but the vision tower's deepstack features go into the first {deepstack}: they must sit with the "
                "tower on the first stage. Choose a pp (and vpp) that keeps that many layers there."
            )
        built = build_model(arch, layout, dtype)
        first = built.chunks[0]
        if first.pre_process:  # the first pipeline stage holds the tower
            tower = build_vision_tower(config.vision_config, dtype)
            if layout.sequence_parallel:
                # Each tensor-parallel rank's stream slice takes its own part of the tower's gradient: megatron
                # sums the gradients of parameters marked so over the TP group (as for norms under SP).
                for param in tower.parameters():
                    param.sequence_parallel = True
            first.add_module(VISION_MODULE, tower)
        return built

    # ---- forward -------------------------------------------------------------------------------
    def _tower(self) -> Optional[nn.Module]:
        """The vision tower on this rank (first pipeline stage), its LoRA layers settled (`peft.view`)."""
        tower = getattr(self.chunks[0], VISION_MODULE, None)
        view = find_view(self)
        if tower is not None and view is not None:
            view.settle_exposed(self.layout.sequence_parallel)
        return tower

    def _lora_exposed_modules(self) -> dict[str, nn.Module]:
        """The tower under transformers' module path, where peft adapts its linears (`model.visual.blocks.0...`)."""
        tower = getattr(self.chunks[0], VISION_MODULE, None)
        return {} if tower is None else {NESTED_VISUAL.removesuffix("."): tower}

    def _media(
        self, tower: Optional[nn.Module], input_ids: torch.Tensor, pixels: Optional[torch.Tensor],
        grid: Optional[torch.Tensor], token_id: int, kind: str,
    ) -> Optional[tuple[torch.Tensor, Optional[MediaFeatures]]]:
        """(placeholder mask, the tower's features; None on ranks without the tower) of one kind of media."""
        if pixels is None:
            return None
        grid_name = "image_grid_thw" if kind == "image" else "video_grid_thw"
        if grid is None:
            raise ValueError(
                f"{'pixel_values' if kind == 'image' else 'pixel_values_videos'} came without {grid_name}: pass both, "
                "as transformers' processor returns them."
            )
        mask = input_ids == token_id
        expected = count_features(grid, self.position_rules.spatial_merge_size)
        if int(mask.sum()) != expected:
            raise ValueError(
                f"The input_ids hold {int(mask.sum())} {kind} placeholder token(s) (id {token_id}) but {grid_name} "
                f"describes {expected} {kind} feature(s). Build the prompt with the model's processor, which expands "
                f"each {kind} into one placeholder per merged patch."
            )
        return mask, encode(tower, pixels.to(mask.device), grid.to(mask.device)) if tower is not None else None

    def _held_media(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw) -> list:
        """(placeholder mask, features) of the images and videos present, checked on every rank; only ranks with
        the tower have features (later pipeline stages neither embed nor add deepstack)."""
        tower = self._tower()  # every forward on every rank: settling LoRA layers is collective
        media = (
            self._media(tower, input_ids, pixel_values, image_grid_thw, self.config.image_token_id, "image"),
            self._media(tower, input_ids, pixel_values_videos, video_grid_thw, self.config.video_token_id, "video"),
        )
        return [item for item in media if item is not None and item[1] is not None]

    def _positions(
        self, input_ids, attention_mask, position_ids, past, image_grid_thw, video_grid_thw, second_per_grid_ts,
        mm_token_type_ids,
    ) -> torch.Tensor:
        """`[3, b, s]` rotary positions, as transformers' model computes them when it is not given any."""
        if position_ids is not None:
            if position_ids.dim() == 3 and position_ids.shape[0] == 4:  # generate's: text positions, then M-RoPE's
                return position_ids[1:]
            return position_ids if position_ids.dim() == 3 else position_ids.expand(3, *position_ids.shape)
        batch, seq = input_ids.shape
        if past == 0 and (image_grid_thw is not None or video_grid_thw is not None):
            positions, self.rope_deltas = self._rope_index(
                input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask
            )
            return positions
        deltas = self.rope_deltas if past > 0 else None
        return text_positions(batch, seq, past, attention_mask, deltas, input_ids.device)

    def _rope_index(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask):
        if mm_token_type_ids is None:
            mm_token_type_ids = token_types(input_ids, self.config.image_token_id, self.config.video_token_id)
        return rope_positions(
            input_ids, mm_token_type_ids, self.position_rules, image_grid_thw, video_grid_thw, second_per_grid_ts,
            attention_mask,
        )

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
        pixel_values: Optional[torch.Tensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        video_grid_thw: Optional[torch.LongTensor] = None,
        second_per_grid_ts: Optional[torch.Tensor] = None,
        mm_token_type_ids: Optional[torch.IntTensor] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """transformers' image-text-to-text forward: full-vocab logits on every rank; loss shifted inside.

        Images and videos replace their placeholder tokens (one per merged patch, as the processor expands
        them); positions follow transformers' multimodal rotary (`position_ids` may be given, `[3, b, s]` or
        generate's `[4, b, s]`). A text-only batch needs no pixels. See `MCoreModelForCausalLM.forward` for the
        rest (KV cache, `logits_to_keep`, labels).
        """
        if inputs_embeds is not None:
            raise NotImplementedError("inputs_embeds is not supported: pass input_ids (and the pixels).")
        if input_ids is None:
            raise ValueError("input_ids is required.")
        cache = cache_argument(past_key_values, cache)
        device = self.rotary_inv_freq.device
        input_ids = input_ids.to(device)
        past = cache.get_seq_length() if cache is not None else 0
        held = self._held_media(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        positions = self._positions(
            input_ids, attention_mask, position_ids, past, image_grid_thw, video_grid_thw, second_per_grid_ts,
            mm_token_type_ids,
        )
        edits = (lambda padded_seq: stream_edits(held, padded_seq)) if held else None
        return self._language_model_forward(
            input_ids, attention_mask, positions, cache, use_cache, labels, logits_to_keep, cache_position,
            output_hidden_states, edits, **kwargs,
        )

    # ---- training (MCoreTrainer's pipeline step) ---------------------------------------------------
    extra_inputs = (
        "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
        "mm_token_type_ids",
    )

    def micro_batches(self, batch: dict, parts: int) -> list[dict]:
        """Row slices, each with the pixels and grids of the media its rows hold (pixels are patches, not rows)."""
        media = {key: batch.pop(key) for key in self.extra_inputs if key in batch and key != "mm_token_type_ids"}
        slices = super().micro_batches(batch, parts)
        batch.update(media)
        rows = batch["input_ids"].shape[0] // parts
        for kind, token in (("image", self.config.image_token_id), ("video", self.config.video_token_id)):
            pixels_key = "pixel_values" if kind == "image" else "pixel_values_videos"
            grid_key = f"{kind}_grid_thw"
            if media.get(pixels_key) is None:
                continue
            merge = self.position_rules.spatial_merge_size**2
            grids = media[grid_key]
            tokens_per_grid = (grids.prod(-1) // merge).tolist()
            patches = torch.cat([grids.new_zeros(1), grids.prod(-1).cumsum(0)]).tolist()
            first_grid = 0
            for part, piece in enumerate(slices):
                wanted = int((batch["input_ids"][part * rows : (part + 1) * rows] == token).sum())
                last_grid, covered = first_grid, 0
                while covered < wanted and last_grid < len(tokens_per_grid):
                    covered += tokens_per_grid[last_grid]
                    last_grid += 1
                if covered != wanted:
                    raise ValueError(
                        f"The {kind} placeholder tokens of rows {part * rows}..{(part + 1) * rows - 1} do not line up "
                        f"with whole grids of {grid_key}: build the batch with the model's processor."
                    )
                piece[pixels_key] = media[pixels_key][patches[first_grid] : patches[last_grid]]
                piece[grid_key] = grids[first_grid:last_grid]
                if kind == "video" and media.get("second_per_grid_ts") is not None:
                    piece["second_per_grid_ts"] = media["second_per_grid_ts"][first_grid:last_grid]
                first_grid = last_grid
        return slices

    def step_inputs(self, batch: dict, first_chunk: bool):
        """Multimodal rotary positions of the micro-batch; on the chunk that embeds, the tower's features (run
        here, so the tower trains with the decoder)."""
        input_ids = batch["input_ids"]
        positions = self._positions(
            input_ids, batch.get("attention_mask"), batch.get("position_ids"), 0, batch.get("image_grid_thw"),
            batch.get("video_grid_thw"), batch.get("second_per_grid_ts"), batch.get("mm_token_type_ids"),
        )
        if not first_chunk:
            return positions, StreamEdits()
        media = self._held_media(
            input_ids, batch.get("pixel_values"), batch.get("image_grid_thw"), batch.get("pixel_values_videos"),
            batch.get("video_grid_thw"),
        )
        return positions, stream_edits(media, input_ids.shape[1])

    # ---- generation ----------------------------------------------------------------------------
    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        """generate's position ids, `[4, b, s]`: the text positions, then the multimodal rotary's three.

        transformers' Qwen-VL classes override this private `GenerationMixin` hook the same way (same signature
        and call in 5.19.0 and 5.24.0); generate then advances all four rows by one per new token.
        """
        text = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        cache = model_kwargs.get(CACHE_KWARG)
        past = cache.get_seq_length() if cache is not None else 0
        types = model_kwargs.get("mm_token_type_ids")
        new_media = types is not None and bool(types[:, past:].any())
        if past and self.rope_deltas is not None and not new_media:
            return text[None] + self.rope_deltas
        if "input_ids" in model_kwargs and model_kwargs["input_ids"].shape[1] > 0:
            inputs_tensor = model_kwargs["input_ids"]
        grids = model_kwargs.get("image_grid_thw"), model_kwargs.get("video_grid_thw")
        if inputs_tensor.dim() == 2 and not inputs_tensor.is_floating_point() and any(g is not None for g in grids):
            positions, self.rope_deltas = self._rope_index(
                inputs_tensor, types, *grids, model_kwargs.get("second_per_grid_ts"), model_kwargs.get("attention_mask")
            )
        else:
            positions = text.unsqueeze(0).expand(3, -1, -1)
            self.rope_deltas = torch.zeros(inputs_tensor.shape[0], 1, dtype=torch.long, device=inputs_tensor.device)
        return torch.cat([text[None].to(positions.device), positions], dim=0)
