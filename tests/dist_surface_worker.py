"""The model surface transformers scripts touch, per layout, against transformers in the same process.

    python tests/dist_surface_worker.py OUT CKPT_ROOT tp1
    torchrun --nproc_per_node=2 tests/dist_surface_worker.py OUT CKPT_ROOT tp2,pp2

For each layout and checkpoint (untied and tied embeddings): the full-vocabulary views, writes through them,
resize_token_embeddings (+7 rows, padded to a multiple, shrunk) against transformers' resize on the HF model
under the same seed, the saved folder reloaded by transformers, output_hidden_states, enable_input_require_grads,
and the refusal of ranks fed different inputs. Every rank writes OUT/<layout>/rank<r>.json; the test judges.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

LAYOUTS = {"tp1": dict(tp=1), "tp2": dict(tp=2), "pp2": dict(pp=2), "tp2sp": dict(tp=2, sequence_parallel=True)}
CHECKPOINTS = {"untied": {}, "tied": {"tie_word_embeddings": True}}
SEED = 11


def build(root: str) -> None:
    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    for name, overrides in CHECKPOINTS.items():
        folder = os.path.join(root, name)
        if not os.path.exists(os.path.join(folder, "config.json")):
            make_tiny_checkpoint(folder, "llama", seed=0, **overrides)


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("inf")


def run_checkpoint(layout: str, folder: str, out: str, rank: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mcore_transformers import MCoreModelForCausalLM
    from mcore_transformers.errors import MCoreTransformersError

    record: dict = {}
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = MCoreModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **LAYOUTS[layout])
    ids = torch.randint(3, 240, (2, 9), generator=torch.Generator().manual_seed(5))

    view = model.get_input_embeddings()
    record["view_shape"] = list(view.weight.shape)
    record["view_equals_hf"] = torch.equal(view.weight, hf.get_input_embeddings().weight)
    record["head_equals_hf"] = torch.equal(model.get_output_embeddings().weight, hf.get_output_embeddings().weight)

    with torch.no_grad():  # a write through the view reaches every shard (and the tied head)
        model.get_input_embeddings().weight[7] = 0.25
        hf.get_input_embeddings().weight[7] = 0.25
    record["write_logits_diff"] = _max_diff(model(input_ids=ids).logits, hf(input_ids=ids).logits)

    # Every rank seeds differently: the resize must draw with rank 0's state, as transformers does in one process.
    for step, (size, multiple) in enumerate([(hf.config.vocab_size + 7, None), (None, 64), (240, None)]):
        torch.manual_seed(SEED + step)
        hf.resize_token_embeddings(size, pad_to_multiple_of=multiple)
        torch.manual_seed(SEED + step + 1000 * rank)
        returned = model.resize_token_embeddings(size, pad_to_multiple_of=multiple)
        record[f"resize{step}"] = {
            "vocab": [model.config.vocab_size, hf.config.vocab_size],
            "returned_rows": returned.weight.shape[0],
            "embeddings_equal": torch.equal(model.get_input_embeddings().weight, hf.get_input_embeddings().weight),
            "head_equal": torch.equal(model.get_output_embeddings().weight, hf.get_output_embeddings().weight),
            "logits_diff": _max_diff(model(input_ids=ids).logits, hf(input_ids=ids).logits),
        }
    saved = os.path.join(out, "saved")
    model.save_pretrained(saved)
    if rank == 0:
        reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
        record["saved_vocab"] = reloaded.config.vocab_size
        record["saved_equal"] = all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), hf.state_dict().values()))
        record["saved_keys_equal"] = list(reloaded.state_dict()) == list(hf.state_dict())

    try:
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        expected = hf(input_ids=ids, output_hidden_states=True).hidden_states
        record["hidden_states"] = {"count": [len(hidden), len(expected)],
                                   "max_diff": max(_max_diff(a, b) for a, b in zip(hidden, expected))}
    except MCoreTransformersError as err:
        record["hidden_states"] = {"error": str(err)}

    model.train()
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()
    loss = model(input_ids=ids, labels=ids).loss
    record["input_require_grads"] = bool(loss.requires_grad)
    model.disable_input_require_grads()
    record["input_require_grads_off"] = bool(model(input_ids=ids, labels=ids).loss.requires_grad)
    model.eval()

    if layout != "tp1":
        try:
            model(input_ids=ids + rank)  # a trainer that shards batches over every process
            record["different_inputs"] = None
        except MCoreTransformersError as err:
            record["different_inputs"] = str(err)
    return record


def main() -> None:
    import torch.distributed as dist

    from mcore_transformers import destroy_parallel_state
    from mcore_transformers.runtime.parallel import init_distributed

    out, root, layouts = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    init_distributed()  # torchrun's world (or one process): ranks are known before the first model loads
    rank = dist.get_rank()
    for layout in layouts:
        results: dict = {}
        for name in CHECKPOINTS:
            folder_out = os.path.join(out, layout, name)
            try:
                if rank == 0:
                    os.makedirs(folder_out, exist_ok=True)
                results[name] = run_checkpoint(layout, os.path.join(root, name), folder_out, rank)
            except Exception as err:  # noqa: BLE001 - the test reports it
                results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            destroy_parallel_state()
        os.makedirs(os.path.join(out, layout), exist_ok=True)
        with open(os.path.join(out, layout, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        if dist.is_initialized():
            dist.barrier()


if __name__ == "__main__":
    main()
