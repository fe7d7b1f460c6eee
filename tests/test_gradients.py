"""One backward in a world of one: loss and gradients equal transformers' on the same checkpoint (fp32).

The trainer suites compare whole training runs; this checks the raw backward of families whose
layers take unusual paths in megatron (GPT-OSS: expert biases added in place after the expert MLP;
MoE routing; Gemma: soft-capped eager attention, (1 + w) norms, scaled and tied embeddings, per-type rotary;
a plain dense model for reference).
"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", "gpt_oss", "gemma2", "gemma3_text"])
def test_backward_matches_transformers(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    from mcore_transformers import MCoreModelForCausalLM, destroy_parallel_state
    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(str(tmp_path), model_type)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).train()
    expected = reference(input_ids=ids, labels=ids).loss
    expected.backward()
    try:
        model = MCoreModelForCausalLM.from_pretrained(str(tmp_path)).train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert abs(loss.item() - expected.item()) < 1e-5 * abs(expected.item())
        want = reference.model.embed_tokens.weight.grad
        got = model.chunks[0].embedding.word_embeddings.weight.grad[: want.shape[0]]
        assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()
        want_norm = reference.model.norm.weight.grad
        got_norm = model.chunks[-1].decoder.final_layernorm.weight.grad
        assert (got_norm - want_norm).abs().max().item() < 1e-5 * want_norm.abs().max().item()
    finally:
        destroy_parallel_state()
