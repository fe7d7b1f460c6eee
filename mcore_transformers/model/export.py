"""The model as an HF folder: the export plan, full HF tensors (RL weight sync), save_pretrained and push_to_hub.

`HFExportMixin` is shared by the model classes: it needs `_bound` (the bound rule table), `shard_layout`,
`config`, `dtype`, `source_folder` / `source_variant` (the checkpoint the model was loaded from) and, for the
plan cache, `_plan` / `_plan_dtype`.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
from typing import Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm.auto import tqdm
from transformers.utils import logging

from ..conversion import distributed
from ..conversion.config_file import config_changes, rewrite_config
from ..conversion.exporter import PlannedTensor, UnclaimedTensors, export_plan, iter_hf_tensors, write_parts
from ..conversion.writer import (
    PartWriter, ShardWriter, check_save_target, copy_source_files, finish_hf_folder, temporary_sibling, write_hf_folder,
)
from ..errors import MCoreTransformersError, SaveTargetError
from ..runtime.parallel import is_rank0


class HFExportMixin:
    """Export and saving in transformers' formats, collective over the ranks of the model."""

    def export_plan(self) -> list[PlannedTensor]:
        """Names, shapes and dtypes of every HF tensor this model exports (collective when it is (re)made: the
        first time, and after `.to(dtype)` or a resize changed what it lists)."""
        if self._plan is None or self._plan_dtype != self.dtype:
            self._plan, self._plan_dtype = export_plan(self._bound, self.shard_layout), self.dtype
        return self._plan

    def export_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective: yield (HF name, full tensor) on every rank, in checkpoint order."""
        yield from iter_hf_tensors(self._bound, self.shard_layout, self.export_plan(), to="all")

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Global parameter count of the HF model (every shard, once; no vocab padding)."""
        total = 0
        for entry in self.export_plan():
            if entry.buffer:  # e.g. DeepSeek-V3's routing score correction: a buffer in transformers too
                continue
            for name, shape in zip(entry.names, entry.shapes):
                if exclude_embeddings and ("embed_tokens" in name or "lm_head" in name):
                    continue
                total += math.prod(shape)
        if only_trainable and not all(p.requires_grad for p in self.parameters()):
            # Parameters replicated over tensor parallelism (norms, LoRA adapters) count on TP rank 0 only.
            tp_rank = ps.get_tensor_model_parallel_rank()
            local = sum(
                p.numel() for p in self.parameters()
                if p.requires_grad and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
            )
            if dist.is_initialized() and dist.get_world_size() > 1:
                count = torch.tensor([local], dtype=torch.float64)
                dist.all_reduce(count, group=ps.get_model_parallel_group())
                local = int(count.item())
            return local
        return total

    def push_to_hub(
        self, repo_id: str, commit_message: Optional[str] = None, private: Optional[bool] = None,
        token: Union[str, bool, None] = None, revision: Optional[str] = None, create_pr: bool = False, **kwargs,
    ):
        """Collective: save the HF folder (every rank takes part), then global rank 0 uploads it with
        huggingface_hub. Every rank raises the same clear error when the Hub cannot be reached."""
        import tempfile

        from huggingface_hub import create_repo, upload_folder

        with tempfile.TemporaryDirectory(prefix="mcore-push-") as scratch:
            folder = os.path.join(scratch, "model")
            self.save_pretrained(folder, max_shard_size=kwargs.pop("max_shard_size", "5GB"))
            outcome: list = [None]
            if is_rank0():
                try:
                    create_repo(repo_id, private=private, token=token, exist_ok=True)
                    outcome[0] = upload_folder(
                        repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload model",
                        token=token, revision=revision, create_pr=create_pr,
                    )
                except Exception as err:  # offline, no token, no rights: one message on every rank
                    outcome[0] = MCoreTransformersError(
                        f"push_to_hub({repo_id!r}) could not upload to the Hugging Face Hub ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}). Save the model with save_pretrained(folder) "
                        "and upload that folder (`hf upload`) where the Hub can be reached and you are logged in."
                    )
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast_object_list(outcome, src=0)
            if isinstance(outcome[0], Exception):
                raise outcome[0]
            return outcome[0]

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        max_shard_size: Union[int, str] = "5GB",
        **kwargs,
    ) -> None:
        """Collective: write an HF folder (safetensors shards + index, source config/tokenizer verbatim).

        Rank 0 creates the files; when every rank sees them (one file system), each rank writes its own bytes of
        them, else rank 0 writes everything, gathered. The folder appears atomically (written beside it, then
        renamed).
        """
        target = str(save_directory)
        error = [None]
        if is_rank0():
            try:
                check_save_target(target)
            except Exception as err:  # re-raised on every rank below, before any collective
                error = [err]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise error[0]

        plan = self.export_plan()
        if dist.is_initialized() and dist.get_world_size() > 1 and self._save_from_every_rank(target, plan, max_shard_size):
            dist.barrier()
            return
        stream = iter_hf_tensors(self._bound, self.shard_layout, plan, to="rank0")
        if is_rank0():
            # Source tensors no rule claims (DeepSeek-V3's MTP layers) are copied through verbatim.
            unclaimed = UnclaimedTensors(self.source_folder, plan, self.source_variant)
            specs = [(n, s, e.dtype) for e in plan for n, s in zip(e.names, e.shapes)] + unclaimed.specs
            progress = tqdm(
                itertools.chain(stream, unclaimed), total=len(specs), desc="Saving", unit="tensor",
                disable=not logging.is_progress_bar_enabled(),
            )
            try:
                changes = config_changes(self.config, self.source_folder, self.dtype)
                write_hf_folder(
                    target, progress, specs, max_shard_size, self.source_folder, self.config.save_pretrained, changes
                )
            finally:
                unclaimed.close()
        else:
            for _ in stream:
                pass
        if dist.is_initialized():
            dist.barrier()

    def _save_from_every_rank(self, target: str, plan: list[PlannedTensor], max_shard_size: Union[int, str]) -> bool:
        """Collective: rank 0 creates the folder's files (headers, sizes), every rank writes its own bytes of them
        (`write_parts`: nothing is gathered), rank 0 finishes and renames the folder. False, with nothing written,
        when some rank does not see rank 0's files (ranks on machines without a shared file system)."""
        rank0, world = is_rank0(), dist.get_world_size()
        setup: list = [None]
        unclaimed = writer = tmp = None
        try:
            if rank0:
                try:
                    # Source tensors no rule claims (DeepSeek-V3's MTP layers) are copied through verbatim.
                    unclaimed = UnclaimedTensors(self.source_folder, plan, self.source_variant)
                    specs = [(n, s, e.dtype) for e in plan for n, s in zip(e.names, e.shapes)] + unclaimed.specs
                    tmp = temporary_sibling(target)
                    writer = ShardWriter(tmp, specs, max_shard_size)
                    setup = [(writer.create_files(), writer.file_sizes())]
                except Exception as err:  # raised on every rank below
                    setup = [err]
            dist.broadcast_object_list(setup, src=0)
            if isinstance(setup[0], Exception):
                raise setup[0]
            locations, sizes = setup[0]
            sees = all(os.path.isfile(path) and os.path.getsize(path) == size for path, size in sizes.items())
            seen: list = [None] * world
            dist.all_gather_object(seen, sees)
            if not all(seen):
                return False
            files = PartWriter(locations)
            shown = rank0 and logging.is_progress_bar_enabled()
            progress = tqdm(total=sum(item.rule.exported for item in self._bound), desc="Saving", unit="tensor",
                            disable=not shown)
            try:
                error = write_parts(self._bound, self.shard_layout, plan, files, progress.update)
                if rank0 and error is None:
                    try:
                        for name, tensor in unclaimed:
                            files.write(name, tensor)
                    except Exception as err:
                        error = err
            finally:
                files.close()
                progress.close()
            errors: list = [None] * world
            dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
            if rank0 and not any(errors):
                try:
                    changes = config_changes(self.config, self.source_folder, self.dtype)
                    finish_hf_folder(tmp, target, writer, self.source_folder, self.config.save_pretrained, changes)
                    tmp = None
                except Exception as err:
                    errors[0] = f"{type(err).__name__}: {err}"
            dist.broadcast_object_list(errors, src=0)
            if error is not None:
                raise error
            failed = next(((rank, text) for rank, text in enumerate(errors) if text), None)
            if failed is not None:
                raise SaveTargetError(f"save_pretrained({target!r}) failed on rank {failed[0]}: {failed[1]}")
            return True
        finally:
            if unclaimed is not None:
                unclaimed.close()
            if rank0 and tmp is not None:  # not renamed into place: a failure, or rank 0 writes it all instead
                shutil.rmtree(tmp, ignore_errors=True)

    def save_distributed_checkpoint(
        self,
        save_directory: Union[str, os.PathLike],
        extra_state: Optional[dict] = None,
        write_extra_files: Optional[Callable[[str], None]] = None,
    ) -> None:
        """Collective: write the weights as a megatron-core distributed checkpoint folder (each rank its own
        shards, in parallel) with the source's config and tokenizer files, which `from_pretrained` loads at
        any layout and `mcore-transformers convert` turns back into an HF folder (conversion/distributed.py).

        `extra_state` (sharded state under keys of its own) goes into the same checkpoint and rank 0 calls
        `write_extra_files(folder)` before it is renamed into place: how `mcore_transformers.peft.
        save_distributed_checkpoint` adds a LoRA adapter.
        """
        plan = self.export_plan()
        names = [name for entry in plan for name in (entry.stack.names if entry.stack else entry.names)]
        unclaimed = UnclaimedTensors(self.source_folder, plan, self.source_variant) if is_rank0() else None

        def write_files(folder: str) -> None:
            self._write_non_weight_files(folder, unclaimed)
            if write_extra_files is not None:
                write_extra_files(folder)

        try:
            distributed.save_distributed(
                self, str(save_directory), names + (unclaimed.names if unclaimed else []), write_files, extra_state
            )
        finally:
            if unclaimed is not None:
                unclaimed.close()

    def _write_non_weight_files(self, folder: str, unclaimed: UnclaimedTensors) -> None:
        """Rank 0, into a distributed checkpoint being written: config (dtype updated), tokenizer and
        generation files, and the source tensors no rule claims (kept verbatim for the next HF save)."""
        if "config.json" in copy_source_files(self.source_folder, folder):
            rewrite_config(folder, config_changes(self.config, self.source_folder, self.dtype))
        else:
            self.config.save_pretrained(folder)
        if unclaimed.names:
            write_hf_folder(
                distributed.unclaimed_folder(folder), unclaimed, unclaimed.specs, "5GB", None, lambda _: None
            )
