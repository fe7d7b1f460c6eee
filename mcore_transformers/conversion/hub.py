"""Turn a folder path or a Hub id into a local folder, with errors that say what to do."""

from __future__ import annotations

import os
from typing import Optional, Union

from ..errors import CheckpointError

# What a causal LM needs from a Hub repo: config, safetensors weights, generation and tokenizer files.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve_checkpoint(
    name_or_path: str,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Optional[str] = None,
    local_files_only: bool = False,
    force_download: bool = False,
    subfolder: str = "",
) -> str:
    """The local folder holding the model's config.json (`subfolder` inside the folder or repository)."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder) if subfolder else path
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise CheckpointError(f"{folder} has no config.json: it is not an HF model folder.")
        return folder
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; pass the model folder that contains config.json.")
    if _looks_like_path(name_or_path):
        raise CheckpointError(f"{name_or_path} does not exist. Check the path, or pass a Hub id like 'org/name'.")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = [f"{subfolder.strip('/')}/{pattern}" for pattern in HUB_PATTERNS] if subfolder else HUB_PATTERNS
    try:
        snapshot = snapshot_download(
            name_or_path, revision=revision, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only, force_download=force_download, allow_patterns=patterns,
        )
        return os.path.join(snapshot, subfolder) if subfolder else snapshot
    except HFValidationError:
        raise CheckpointError(
            f"{name_or_path!r} is neither an existing folder nor a valid Hub id ('org/name')."
        ) from None
    except Exception as err:  # offline, unknown repo, gated repo, network errors
        raise CheckpointError(
            f"{name_or_path!r} is not a local folder and could not be fetched from the Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "If you are offline, download it where you have network and pass the local folder path."
        ) from None
