"""Shared by the vLLM suites: the worker environment and the folders mcore_transformers saved (made once)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import folders  # noqa: E402


def worker_env(**extra: str) -> dict:
    """os.environ without a launcher's variables; one thread per process, offline, a small vLLM KV cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_CPU_KVCACHE_SPACE="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def saved(tmp_path_factory) -> dict:
    return folders.save_all(str(tmp_path_factory.mktemp("vllm-folders")), worker_env())
