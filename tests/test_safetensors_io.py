"""safetensors I/O of our own: the streaming writer (conversion/writer.py) writes files safetensors reads back
exactly, whatever order the tensors arrive in, every dtype, sharded or single; the reader's pread slices
(conversion/reader.py) equal safetensors' own slicing along every dim, through both of its paths."""

from __future__ import annotations

import os

import pytest
import torch


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(3, 5, generator=generator).to(torch.bfloat16),  # odd byte count before wider types
        "w.f32": torch.randn(7, generator=generator),
        "w.f16": torch.randn(2, 3, generator=generator).half(),
        "w.f64": torch.randn(2, generator=generator).double(),
        "i.i64": torch.arange(5),
        "i.u8": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=generator),
        "m.bool": torch.tensor([True, False, True]),
        "s.scalar": torch.tensor(3.5),
        "e.empty": torch.empty(0, 4),
        "v.strided": torch.randn(4, 6, generator=generator)[:, ::2],  # not contiguous
    }


@pytest.mark.parametrize("max_shard_size", ["5GB", 48])
def test_files_read_back_exactly_in_any_arrival_order(tmp_path, max_shard_size):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mcore_transformers.conversion.writer import ShardWriter

    tensors = _tensors()
    writer = ShardWriter(str(tmp_path), [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], max_shard_size)
    for name in reversed(list(tensors)):
        writer.add(name, tensors[name])
    writer.finish()
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert (len(files) > 1) == (max_shard_size == 48)
    assert ("model.safetensors.index.json" in os.listdir(tmp_path)) == (len(files) > 1)
    read = {}
    for file in files:
        read.update(load_file(str(tmp_path / file)))  # safetensors validates the header and offsets
        with safe_open(str(tmp_path / file), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    assert sorted(read) == sorted(tensors)
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def test_a_tensor_unlike_its_plan_is_refused(tmp_path):
    from mcore_transformers.conversion.writer import ShardWriter

    writer = ShardWriter(str(tmp_path), [("w", (2, 3), torch.float32)], "5GB")
    with pytest.raises(RuntimeError, match="planned"):
        writer.add("w", torch.zeros(3, 2))
    writer.close()


@pytest.mark.parametrize("block", [None, 64])  # 64 bytes: narrow slices go through the block buffer
def test_slices_equal_safetensors_slicing(tmp_path, monkeypatch, block):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mcore_transformers.conversion import reader as reader_module
    from mcore_transformers.conversion.reader import CheckpointReader

    if block is not None:
        monkeypatch.setattr(reader_module, "SLICE_BLOCK_BYTES", block)
    generator = torch.Generator().manual_seed(1)
    tensors = {
        "m2": torch.randn(6, 10, generator=generator).to(torch.bfloat16),
        "m3": torch.randn(4, 6, 5, generator=generator),
        "v": torch.randn(12, generator=generator).half(),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with CheckpointReader(str(tmp_path)) as reader, safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        for name, tensor in tensors.items():
            for dim in range(tensor.dim()):
                size = tensor.shape[dim]
                for start, stop in ((0, size // 2), (size // 2, size), (1, size - 1), (0, size), (2, 2)):
                    index = (slice(None),) * dim + (slice(start, stop),)
                    expected = handle.get_slice(name)[index]
                    got = reader.read(name, dim, start, stop)
                    assert got.dtype == expected.dtype and torch.equal(got, expected), (name, dim, start, stop)
