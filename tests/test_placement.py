"""Each rank writes its own bytes of a saved file (conversion/placement.py, writer.PartWriter): for every rule type,
the runs each shard rank writes rebuild exactly what the rule's export of all shards gives, in memory and in a
safetensors file written rank by rank; a rule whose export transposes has no placement (its shards are gathered)."""

from __future__ import annotations

import pytest
import torch

from mcore_transformers.conversion import rules as R
from mcore_transformers.conversion.exporter import write_row_block, write_runs
from mcore_transformers.conversion.placement import shard_placement
from mcore_transformers.conversion.writer import PartWriter, ShardWriter

H = 5  # hidden size


def _layout(tp: int, kv: int = 2, groups: int = 2, etp: int = 1) -> R.ShardLayout:
    return R.ShardLayout(
        tp_rank=0, tp_size=tp, num_attention_heads=4, num_key_value_heads=kv, num_query_groups=groups, head_dim=3,
        vocab_size=10, padded_vocab_size=12, etp_size=etp, num_experts=4,
    )


# (rule, layout, local shard shape)
PLACED = {
    "column": (R.Column("m", "h"), _layout(2), (4, H)),
    "column-bias-tp4": (R.Column("m", "h"), _layout(4), (2,)),
    "row": (R.Row("m", "h"), _layout(2), (H, 3)),
    "row-tp4-3d": (R.Row("m", "h"), _layout(4), (H, 2, 3)),
    "vocab-padded": (R.VocabColumn("m", "h"), _layout(2), (6, H)),
    "qkv": (R.FusedQKV("m", "q", "k", "v"), _layout(2), (12, H)),
    "qkv-bias": (R.FusedQKV("m", "q", "k", "v"), _layout(2), (12,)),
    "qkv-kv-replicated": (R.FusedQKV("m", "q", "k", "v"), _layout(2, kv=1), (12, H)),
    "packed-qkv": (R.PackedQKV("m", "qkv"), _layout(2), (12, H)),
    "gate-up": (R.FusedGateUp("m", "g", "u"), _layout(2), (4, H)),
    "gate-up-rows": (R.GateUpRows("m", "gu"), _layout(2), (4, H)),
    "interleaved-gate-up": (R.InterleavedGateUp("m", "gu"), _layout(2), (4, H)),
    "expert-row-etp2": (R.Expert(R.Row("m", "h")), _layout(1, etp=2), (H, 3)),
    "stacked-expert-gate-up": (R.ExpertStack(R.GateUpRows("m", "gu")), _layout(1, etp=2), (4, H)),
}
GATHERED = {
    "transposed-row": (R.TransposedRow("m", "h"), _layout(2), (H, 3)),
    "transposed-gate-up-rows": (R.TransposedGateUpRows("m", "gu"), _layout(2), (4, H)),
    "interleaved-gate-up-transposed": (R.InterleavedGateUp("m", "gu", transposed=True), _layout(2), (4, H)),
}


def _shards(rule, layout, shape) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) for _ in range(rule.shard_count(layout))]


@pytest.mark.parametrize("case", sorted(PLACED))
def test_every_ranks_runs_rebuild_the_export(case):
    rule, layout, shape = PLACED[case]
    shards = _shards(rule, layout, shape)
    expected = rule.export(shards, layout)
    hf_shapes = [tuple(t.shape) for t in expected]
    rebuilt = [torch.full(s, float("nan")) for s in hf_shapes]
    for rank, shard in enumerate(shards):
        placement = shard_placement(rule, layout, shape, hf_shapes, rank)
        assert placement is not None
        for run in placement.runs:
            dim = placement.split_dim
            rebuilt[run.tensor].narrow(dim, run.hf_start, run.length).copy_(shard.narrow(dim, run.local_start, run.length))
    for got, want in zip(rebuilt, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", sorted(GATHERED))
def test_a_transposing_export_has_no_placement(case):
    rule, layout, shape = GATHERED[case]
    hf_shapes = [tuple(t.shape) for t in rule.export(_shards(rule, layout, shape), layout)]
    assert shard_placement(rule, layout, shape, hf_shapes, 0) is None


@pytest.mark.parametrize("case", ["qkv", "row-tp4-3d", "vocab-padded", "row"])
def test_ranks_writing_their_runs_make_the_file_safetensors_reads(tmp_path, case):
    from safetensors.torch import load_file

    rule, layout, shape = PLACED[case]
    shards = [shard.to(torch.bfloat16) for shard in _shards(rule, layout, shape)]
    expected = rule.export(shards, layout)
    names = [f"t{i}" for i in range(len(expected))]
    specs = [(name, tuple(t.shape), t.dtype) for name, t in zip(names, expected)] + [("z.last", (3,), torch.float32)]
    writer = ShardWriter(str(tmp_path), specs, "5GB")
    locations = writer.create_files()
    hf_shapes = [tuple(t.shape) for t in expected]
    placements = [shard_placement(rule, layout, shape, hf_shapes, rank) for rank in range(len(shards))]
    for rank in reversed(range(len(shards))):  # each rank on its own, in any order
        files = PartWriter(locations)
        if placements[rank].split_dim == 0:
            write_runs(files, shards[rank], placements[rank], names, hf_shapes, [0] * len(names))
        else:  # what the all-to-all leaves this rank: its block of rows of every rank's shard
            blocks = [shape[0] // len(shards) + (b < shape[0] % len(shards)) for b in range(len(shards))]
            first = sum(blocks[:rank])
            received = torch.stack([shard[first : first + blocks[rank]] for shard in shards])
            write_row_block(files, received, placements, first, names, hf_shapes, [0] * len(names))
        if rank == 0:
            files.write("z.last", torch.arange(3.0))
        files.close()
    writer.finish()
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(loaded) == sorted(names + ["z.last"])
    for name, tensor in zip(names, expected):
        assert torch.equal(loaded[name], tensor)
    assert torch.equal(loaded["z.last"], torch.arange(3.0))
