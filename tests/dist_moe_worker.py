"""Mixture-of-experts worker: `python dist_moe_worker.py LAYOUT ROOT OUT` (world of one) or the same under
`torchrun --nproc_per_node=2`. One launch per layout loads every MoE case of that layout in turn and
records, per case and rank, in OUT/<case>/:

  rank<r>.pt     logits and loss of the fixed batch, digests of every tensor export_hf_weights yielded,
                 num_parameters, the bytes this rank read from the checkpoint
  saved/         rank 0's save_pretrained folder
  rank<r>.json   error cases: the exception raised (or none) and whether anything was written;
                 any case that crashed unexpectedly: its traceback

It judges nothing: tests/test_moe.py compares these with transformers and the source checkpoints.
The case tables below are shared with the test; nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback

# name -> launch: `world` processes; the rest are from_pretrained's parallel kwargs.
LAYOUTS: dict[str, dict] = {
    "single": dict(world=1),
    "ep2": dict(world=2, ep=2),
    "tp2sp": dict(world=2, tp=2, sequence_parallel=True),  # experts split over etp = tp = 2
    "tp2ep2etp1": dict(world=2, tp=2, ep=2, etp=1),  # attention over tp, whole experts over ep
    "pp2": dict(world=2, pp=2),
}

FAMILIES = (
    "qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss", "glm4_moe", "glm4_moe_lite", "deepseek_v2",
    "ernie4_5_moe", "minimax_m2", "granitemoe", "phimoe",
)
MTP_LAYER = 4  # tiny checkpoints have 4 layers; DeepSeek-V3 and GLM-4.5 keep their MTP layer right after them

# checkpoint name -> (model_type, make_tiny_checkpoint kwargs, extra)
CHECKPOINTS: dict[str, tuple[str, dict, str]] = {
    **{family: (family, {}, "") for family in FAMILIES},
    # transformers' in-memory layout: experts stacked in one tensor per projection (it loads and re-saves it)
    "qwen3_moe-stacked": ("qwen3_moe", {"stacked_experts": True}, ""),
    "mixtral-stacked": ("mixtral", {"stacked_experts": True}, ""),
    "ernie4_5_moe-stacked": ("ernie4_5_moe", {"stacked_experts": True}, ""),  # + its score correction's in-memory name
    "minimax_m2-stacked": ("minimax_m2", {"stacked_experts": True}, ""),
    "phimoe-stacked": ("phimoe", {"stacked_experts": True}, ""),  # + its router's in-memory name (mlp.router)
    # multi-token-prediction tensors transformers does not use: they must survive a save untouched
    "deepseek_v3-mtp": ("deepseek_v3", {"num_nextn_predict_layers": 1}, "mtp"),
    # published GLM-4.5 / DeepSeek-V3 dtypes: everything bf16 but the float32 score correction (a bf16 router weight,
    # which transformers widens to float32)
    "glm4_moe-hub-dtypes": ("glm4_moe", {}, "hub-dtypes"),
    "glm4_moe-mtp": ("glm4_moe", {"num_nextn_predict_layers": 1}, "mtp"),
    # DeepSeek-V2-Lite's shape: q_proj (no q_lora_rank), greedy softmax routing over all experts, no scaling
    "deepseek_v2-lite": ("deepseek_v2", {
        "q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
    }, ""),
    # Kimi K2's shape: a deepseek_v3 checkpoint with one expert group (no group limit), 8 experts per token, its
    # routed scaling factor and YaRN factor 32
    "deepseek_v3-kimi_k2": ("deepseek_v3", {
        "n_routed_experts": 16, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64, "beta_fast": 1.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    }, ""),
    # bad inputs
    "qwen3_moe-experts3": ("qwen3_moe", {"num_experts": 3}, ""),
    "qwen3_moe-missing-expert": ("qwen3_moe", {}, "drop:model.layers.2.mlp.experts.3.up_proj.weight"),
    "llama": ("llama", {}, ""),
}

_EVERY = [*FAMILIES]
# bfloat16 loads of the families whose transformers router rounds elsewhere than megatron's: the float32 router weight
# of DeepSeek / GLM / ERNIE and MiniMax-M2's model-dtype logits scored in float32 (router_precision), the top-k chosen
# among float32 probabilities of Qwen-MoE / OLMoE / Mixtral (softmax_weights_dtype)
BF16_CASES: dict[str, str] = {
    **{f"{family}-bf16": family
       for family in ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "deepseek_v2", "ernie4_5_moe", "minimax_m2",
                      "qwen3_moe", "qwen2_moe", "olmoe", "mixtral")},
    "glm4_moe-hub-dtypes-bf16": "glm4_moe-hub-dtypes",
}
PARITY: dict[str, list[str]] = {
    "single": _EVERY + ["qwen3_moe-stacked", "mixtral-stacked", "deepseek_v3-mtp", "deepseek_v3-kimi_k2",
                        "glm4_moe-mtp", "deepseek_v2-lite", "ernie4_5_moe-stacked", "minimax_m2-stacked",
                        "phimoe-stacked", *BF16_CASES],
    "ep2": _EVERY + ["qwen3_moe-stacked", "mixtral-stacked", "deepseek_v3-mtp", "deepseek_v3-kimi_k2",
                     "deepseek_v2-lite", "glm4_moe-bf16", "ernie4_5_moe-bf16", "minimax_m2-bf16"],
    # expert biases need etp=1
    "tp2sp": [f for f in _EVERY if f != "gpt_oss"] + ["mixtral-stacked", "deepseek_v2-lite"],
    "tp2ep2etp1": _EVERY + ["qwen3_moe-stacked"],
    "pp2": _EVERY + ["deepseek_v3-mtp", "deepseek_v3-kimi_k2"],
}

# (case, layout, checkpoint, from_pretrained kwargs beyond the layout, error class, words in the message)
ERRORS = [
    ("experts-not-divisible-by-ep", "ep2", "qwen3_moe-experts3", {}, "LayoutError", ["ep=2", "3 routed experts"]),
    ("ep-on-dense-model", "ep2", "llama", {}, "LayoutError", ["ep=2", "no experts"]),
    ("expert-tensor-missing", "ep2", "qwen3_moe-missing-expert", {}, "CheckpointError",
     ["missing", "model.layers.2.mlp.experts.3.up_proj.weight"]),
    ("ep-etp-pp-exceed-world", "single", "qwen3_moe", {"ep": 2}, "LayoutError", ["ep·etp·pp", "world size 1"]),
    ("expert-biases-with-etp2", "tp2sp", "gpt_oss", {}, "LayoutError", ["etp=2", "expert biases", "etp=1"]),
]


def build_checkpoints(root: str, names=None) -> None:
    """Write the tiny checkpoints of CHECKPOINTS (all, or `names`) under `root` (transformers' save_pretrained)."""
    import torch
    from safetensors.torch import load_file, save_file

    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    for name, (model_type, kwargs, extra) in CHECKPOINTS.items():
        if names is not None and name not in names:
            continue
        folder = os.path.join(root, name)
        if os.path.exists(os.path.join(folder, "config.json")):
            continue
        make_tiny_checkpoint(folder, model_type, **kwargs)
        path = os.path.join(folder, "model.safetensors")
        if extra == "mtp":  # a DeepSeek-V3 MTP layer: a decoder layer plus its projection and norms
            tensors = load_file(path)
            generator = torch.Generator().manual_seed(1)
            last = f"model.layers.{MTP_LAYER - 1}."
            for key in [k for k in tensors if k.startswith(last)]:
                mtp_key = key.replace(last, f"model.layers.{MTP_LAYER}.")
                tensors[mtp_key] = torch.randn(tensors[key].shape, generator=generator)
            hidden = tensors["model.norm.weight"].shape[0]
            extras = (("enorm.weight", (hidden,)), ("hnorm.weight", (hidden,)), ("eh_proj.weight", (hidden, 2 * hidden)))
            for key, shape in extras:
                tensors[f"model.layers.{MTP_LAYER}.{key}"] = torch.randn(shape, generator=generator)
            save_file(tensors, path, metadata={"format": "pt"})
        elif extra == "hub-dtypes":
            tensors = load_file(path)
            tensors = {k: t if k.endswith("e_score_correction_bias") else t.to(torch.bfloat16) for k, t in tensors.items()}
            save_file(tensors, path, metadata={"format": "pt"})
        elif extra.startswith("drop:"):
            tensors = load_file(path)
            del tensors[extra[len("drop:"):]]
            save_file(tensors, path, metadata={"format": "pt"})


def make_batch(vocab_size: int) -> dict:
    """Two rows of 11 tokens; the second left-padded by 3 (labels -100 there)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.clone()
    labels[1, :3] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _digest(tensor) -> list:
    import hashlib

    data = tensor.detach().cpu().contiguous()
    raw = data.view(-1).view(__import__("torch").uint8) if data.numel() else data
    return [list(data.shape), str(data.dtype), hashlib.sha256(raw.numpy().tobytes()).hexdigest()]


def _write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(path + ".part", path)


def _parallel_kwargs(layout: str) -> dict:
    return {k: v for k, v in LAYOUTS[layout].items() if k != "world"}


class _ReadCounter:
    """Remembers the CheckpointReader from_pretrained opens, to report the bytes this rank read."""

    def __init__(self):
        import mcore_transformers.model.loading as modeling  # where from_pretrained opens its reader

        self.readers = []
        base = modeling.CheckpointReader
        counter = self

        class CountingReader(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                counter.readers.append(self)

        modeling.CheckpointReader = CountingReader


def parity_case(layout: str, name: str, root: str, out: str, rank: int, counter: _ReadCounter) -> None:
    import torch
    import torch.distributed as dist

    from mcore_transformers import MCoreModelForCausalLM

    counter.readers.clear()
    bf16 = name in BF16_CASES
    model = MCoreModelForCausalLM.from_pretrained(
        os.path.join(root, BF16_CASES.get(name, name)), **_parallel_kwargs(layout),
        **(dict(dtype=torch.bfloat16) if bf16 else {}),
    )
    batch = make_batch(model.config.vocab_size)
    with torch.no_grad(), _recording_routers(model, enabled=bf16) as routers:
        output = model(**batch)
    exported = {hf_name: _digest(tensor) for hf_name, tensor in model.export_hf_weights()}
    os.makedirs(os.path.join(out, name), exist_ok=True)
    model.save_pretrained(os.path.join(out, name, "saved"))
    record = dict(
        logits=output.logits, loss=output.loss, exported=exported, num_parameters=model.num_parameters(),
        bytes_read=counter.readers[-1].bytes_read, routers=routers,
    )
    torch.save(record, os.path.join(out, name, f"rank{rank}.pt"))
    del model
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _recording_routers(model, enabled: bool):
    """Each MoE layer's router, in layer order: its input [tokens, hidden], routing weights and map [tokens, experts]."""
    from megatron.core.transformer.moe.router import TopKRouter

    records: list = []
    hook = lambda module, args, out: records.append((args[0].reshape(-1, args[0].shape[-1]), *out))  # noqa: E731
    routers = [module for module in model.modules() if isinstance(module, TopKRouter)] if enabled else []
    handles = [router.register_forward_hook(hook) for router in routers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def error_case(case, layout: str, root: str, out: str, rank: int) -> None:
    from mcore_transformers import MCoreModelForCausalLM

    name, _, checkpoint, kwargs, _, _ = case
    folder = os.path.join(root, checkpoint)
    before = sorted(os.listdir(folder))
    raised = None
    try:
        MCoreModelForCausalLM.from_pretrained(folder, **{**_parallel_kwargs(layout), **kwargs})
    except Exception as err:  # recorded, judged by the test
        raised = dict(type=type(err).__name__, mro=[c.__name__ for c in type(err).__mro__], message=str(err))
    unchanged = sorted(os.listdir(folder)) == before
    _write_json(os.path.join(out, name, f"rank{rank}.json"), dict(raised=raised, unchanged=unchanged))


def main() -> None:
    layout, root, out = sys.argv[1:4]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", 0))
    counter = _ReadCounter()
    for name in PARITY[layout]:
        try:
            parity_case(layout, name, root, out, rank, counter)
        except Exception:
            _write_json(os.path.join(out, name, f"rank{rank}.json"), dict(crashed=traceback.format_exc()))
            raise  # the other ranks would wait in a collective: end the launch
    for case in ERRORS:
        if case[1] == layout:
            error_case(case, layout, root, out, rank)
    if dist.is_initialized():
        dist.barrier()
    open(os.path.join(out, f"done.rank{rank}"), "w").close()


if __name__ == "__main__":
    main()
