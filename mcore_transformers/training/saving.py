"""Writing an HF folder (full model or adapter) into a folder that already holds other files."""

from __future__ import annotations

import os
import shutil

from ..runtime.parallel import barrier, is_rank0

EXPORT_SCRATCH = ".mcore-export"


def write_into_folder(output_dir: str, writer) -> None:
    """Collective: run `writer(folder)` (save_pretrained, save_adapter) into `output_dir` without
    disturbing other files there (checkpoints, logs).

    Those writers replace their target whole, so they write into a scratch folder inside `output_dir`;
    rank 0 then moves the files up, first removing weights left by an earlier save (shard sets differ).
    """
    scratch = os.path.join(output_dir, EXPORT_SCRATCH)
    rank0 = is_rank0()
    if rank0 and os.path.exists(scratch):
        shutil.rmtree(scratch)
    barrier()
    writer(scratch)
    if rank0:
        written = os.listdir(scratch)
        if any(name.endswith(".safetensors") for name in written):
            for name in os.listdir(output_dir):
                if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")):
                    os.remove(os.path.join(output_dir, name))
        for name in written:
            target = os.path.join(output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(scratch, name), target)
        shutil.rmtree(scratch)
    barrier()
