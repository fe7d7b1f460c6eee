"""LoRA on mixture-of-experts models: `torchrun --nproc_per_node=2 dist_lora_moe_worker.py ROOT OUT [CASES]`.

One launch runs every case, layout after layout (the parallel state is rebuilt between layouts):
  dp2     tp=1, ep=1 (every rank holds all experts: the ep=1 reference layout)
  tp2     tp=2, ep=1 (etp = tp = 2: every expert's gate/up rows and down columns split over the 2 ranks)
  ep2     tp=1, ep=2 (each rank holds 2 of the 4 experts; attention is data-parallel over the 2 ranks)
  tp2ep2  tp=2, ep=2, etp=1 (attention split over tp, whole experts over ep)
ROOT holds the tiny MoE checkpoints and adapters (`prepare(ROOT)`, run by the pytest side). Per case
and rank it writes OUT/<case>/rank<r>.json and .pt, plus the folders rank 0 saved. It judges
nothing: tests/test_lora_moe.py compares with transformers (+ peft) and with merged HF weights.

The per-expert adapters are written here (`write_per_expert_adapter`): transformers 5 has no module
per expert, so no HF model can make them; their keys are the per-expert naming vLLM and
transformers-4-era peft use (`base_model.model.model.layers.N.mlp.experts.E.gate_proj.lora_A.weight`).
`merged_reference` is the oracle: the HF model with every W + scaling·B·A merged in fp32;
`reference_gradients` runs autograd through those merged weights for d loss / d A, B.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_lora_worker import finish, make_inputs, merge_case, record_case  # noqa: E402

LAYOUTS = {
    "dp2": dict(tp=1, ep=1, etp=None),
    "tp2": dict(tp=2, ep=1, etp=None),
    "ep2": dict(tp=1, ep=2, etp=None),
    "tp2ep2": dict(tp=2, ep=2, etp=1),
}
RANKS = 2

# qwen3_moe: 4 experts of 32, top-2; stacked: the same family saved as transformers holds it in memory;
# qwen2_moe: a shared expert (with its gate) and a dense layer (1) among the MoE layers.
CHECKPOINTS = {
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-stacked": ("qwen3_moe", {"stacked_experts": True}),
    "qwen2_moe": ("qwen2_moe", {}),
    "gpt_oss": ("gpt_oss", {}),  # experts stored fused only: no per-expert HF names
    # 16 experts, shared experts, a dense first layer, q/k/v biases and q/k norms
    "glm4_moe": ("glm4_moe", {}),
    # multi-latent attention (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj), 8 experts, shared experts
    "glm4_moe_lite": ("glm4_moe_lite", {}),
    # for HF-made adapters only: MLA (deepseek_v2), a shared expert and dense layers (ernie4_5_moe), no dense MLP
    # at all (minimax_m2), and experts fused on disk too (granitemoe: input_linear / output_linear)
    "deepseek_v2": ("deepseek_v2", {}),
    "ernie4_5_moe": ("ernie4_5_moe", {}),
    "minimax_m2": ("minimax_m2", {}),
    "granitemoe": ("granitemoe", {}),
    "phimoe": ("phimoe", {}),  # biased q/k/v/o_proj, per-expert w1 / w3 / w2 on disk (stacked in memory); eval only
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]  # the HF names peft sees in MLA
EXPERT = ["gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 8
# Adapters: "attn" made by HF peft; "experts" written per expert (with q_proj, v_proj beside them);
# "fused" made by HF peft on transformers 5 from target_modules=EXPERT (peft turns it into target_parameters
# on the stacked experts, gate_up at rank 2r); "tparams" (export cases) made here with target_parameters;
# "hf" made by HF peft from the family's attention names + EXPERT (attention modules + fused experts).
EXPERT_ADAPTER_TARGETS = ["q_proj", "v_proj", *EXPERT]
FAMILY_EXPERT_ADAPTER_TARGETS = {"glm4_moe_lite": [*MLA, *EXPERT]}  # per-expert adapters on MLA families
HF_ADAPTER_TARGETS = {
    "glm4_moe": [*ATTENTION, *EXPERT], "glm4_moe_lite": [*MLA, *EXPERT], "deepseek_v2": [*MLA, *EXPERT],
    # minimax_m2's expert names are w1 (gate), w3 (up), w2 (down): peft turns those into target_parameters.
    "ernie4_5_moe": [*ATTENTION, *EXPERT], "minimax_m2": [*ATTENTION, "w1", "w2", "w3"],
    "granitemoe": ATTENTION, "phimoe": ATTENTION,
}
# Families whose experts peft on transformers 5 reaches only as parameters: granitemoe's are stacked on disk too
# (`input_linear` / `output_linear` name no module), and peft 0.21 has no w1 / w2 / w3 rewrite for phimoe (it has
# one for mixtral); in target_modules those names silently adapt nothing. Their adapters name the stacked tensors.
HF_ADAPTER_PARAMETERS = {"granitemoe": ["gate_up_proj", "down_proj"], "phimoe": ["gate_up_proj", "down_proj"]}
EVAL_ONLY = {"phimoe"}  # SparseMixer routing refuses training
EXPORT_TARGETS = ["q_proj", *EXPERT]
ADAPTER_CHECKPOINT = {"qwen3_moe-stacked": "qwen3_moe"}  # the stacked checkpoint uses qwen3_moe's adapters


@dataclass(frozen=True)
class Case:
    kind: str
    checkpoint: str
    layout: str
    adapter: str = "experts"

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.checkpoint}-{self.adapter}-{self.layout}"


CASES = [
    # attention LoRA (HF-made) on a MoE model: logits, then an mcore-made attention adapter exported
    Case("hf-logits", "qwen3_moe", "ep2", "attn"),
    Case("hf-logits", "qwen3_moe", "tp2ep2", "attn"),
    Case("export", "qwen3_moe", "ep2", "attn"),
    Case("export", "qwen3_moe", "tp2ep2", "attn"),
    # per-expert adapters: ep=1, ep=2, tp=2 + ep=2; stacked-expert checkpoint; shared expert + dense layer
    Case("hf-logits", "qwen3_moe", "dp2"),
    Case("hf-logits", "qwen3_moe", "tp2"),
    Case("hf-logits", "qwen3_moe", "ep2"),
    Case("hf-logits", "qwen3_moe", "tp2ep2"),
    Case("hf-logits", "qwen3_moe-stacked", "ep2"),
    Case("hf-logits", "qwen2_moe", "ep2"),
    Case("export", "qwen3_moe", "tp2"),
    Case("export", "qwen3_moe", "ep2"),
    Case("export", "qwen3_moe", "tp2ep2"),
    Case("export", "qwen2_moe", "ep2"),
    Case("merge", "qwen3_moe", "ep2"),
    Case("merge", "qwen2_moe", "tp2ep2"),
    Case("merge", "qwen3_moe-stacked", "tp2ep2"),
    # transformers-5 fused-expert adapters (target_parameters), read per expert
    Case("hf-logits", "qwen3_moe", "ep2", "fused"),
    Case("hf-logits", "qwen3_moe", "tp2", "fused"),
    Case("hf-logits", "qwen3_moe-stacked", "tp2ep2", "fused"),
    Case("export", "qwen3_moe", "ep2", "tparams"),
    # refused before anything is made or written
    Case("error-target-parameters", "qwen3_moe", "ep2", "none"),
    Case("error-no-per-expert-names", "gpt_oss", "ep2", "none"),
    Case("error-experts-as-modules", "granitemoe", "ep2", "none"),  # peft reaches them only as target_parameters
    # newer families: per-expert adapters (attention, shared experts, the dense layer, routed experts) at ep=2
    # (logits and gradients) and tp=2 (etp=2); HF-made adapters (attention + fused experts) against HF peft
    Case("hf-logits", "glm4_moe", "ep2"),
    Case("hf-logits", "glm4_moe", "tp2"),
    Case("hf-logits", "glm4_moe", "tp2", "hf"),
    Case("hf-logits", "glm4_moe_lite", "ep2"),
    Case("hf-logits", "glm4_moe_lite", "tp2", "hf"),
    Case("hf-logits", "deepseek_v2", "tp2", "hf"),
    Case("hf-logits", "ernie4_5_moe", "tp2", "hf"),
    Case("hf-logits", "minimax_m2", "ep2", "hf"),
    Case("hf-logits", "granitemoe", "ep2", "hf"),
    # HF-made adapters on stacked-only experts (granitemoe: one LoRA per expert on the whole gate_up / down slice)
    # and on phimoe (biased o_proj; evaluation only): logits, gradients (tp = 1, granitemoe), fused write-back
    Case("hf-logits", "granitemoe", "dp2", "hf"),
    Case("hf-logits", "granitemoe", "tp2", "hf"),
    Case("hf-logits", "granitemoe", "tp2ep2", "hf"),
    Case("hf-logits", "phimoe", "ep2", "hf"),
    Case("hf-logits", "phimoe", "tp2", "hf"),
    Case("hf-logits", "phimoe", "tp2ep2", "hf"),
]


# ---- the inputs on disk (run once, by the pytest side) ------------------------------------------
def expert_adapter_targets(checkpoint: str) -> list[str]:
    """The target names of the per-expert ("experts") adapter of `checkpoint`."""
    return FAMILY_EXPERT_ADAPTER_TARGETS.get(checkpoint, EXPERT_ADAPTER_TARGETS)


def adapter_path(root: str, checkpoint: str, adapter: str) -> str:
    return os.path.join(root, "adapters", f"{ADAPTER_CHECKPOINT.get(checkpoint, checkpoint)}-{adapter}")


def hf_projection_shapes(hf_model, targets) -> dict[str, tuple[int, int]]:
    """HF module path -> (out, in) of every projection named in `targets`, per expert for fused experts."""
    import torch

    shapes = {}
    for name, module in hf_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            shapes[name] = (module.out_features, module.in_features)
        gate_up = getattr(module, "gate_up_proj", None)
        if isinstance(gate_up, torch.nn.Parameter) and gate_up.dim() == 3:
            experts, double, hidden = gate_up.shape
            for e in range(experts):
                for proj, shape in (("gate_proj", (double // 2, hidden)), ("up_proj", (double // 2, hidden)),
                                    ("down_proj", (hidden, double // 2))):
                    if proj in targets:
                        shapes[f"{name}.{e}.{proj}"] = shape
    return shapes


def write_per_expert_adapter(hf_model, folder: str, targets, seed: int, r: int = R, alpha: int = ALPHA) -> None:
    """A random LoRA adapter in per-expert HF naming for every projection of `hf_model` named in `targets`:
    plain linears by their module path, fused experts (`experts.gate_up_proj` [E, 2I, H],
    `experts.down_proj` [E, H, I]) as `experts.E.gate_proj` / `up_proj` / `down_proj` per expert."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (out_features, in_features) in sorted(hf_projection_shapes(hf_model, targets).items()):
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r, in_features, generator=gen) / in_features**0.5
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(out_features, r, generator=gen) * 0.5
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), task_type="CAUSAL_LM").save_pretrained(folder)


def prepare(root: str) -> None:
    """Write the tiny MoE checkpoints and the adapters into ROOT (idempotent)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    for name, (model_type, kwargs) in CHECKPOINTS.items():
        if not os.path.exists(os.path.join(root, name, "config.json")):
            make_tiny_checkpoint(os.path.join(root, name), model_type, **kwargs)

    def hf(name):
        return AutoModelForCausalLM.from_pretrained(os.path.join(root, name), dtype=torch.float32)

    for number, name in enumerate(["qwen3_moe", "qwen2_moe", "glm4_moe", "glm4_moe_lite"]):
        target = adapter_path(root, name, "experts")
        if not os.path.exists(os.path.join(target, "adapter_config.json")):
            write_per_expert_adapter(hf(name), target, expert_adapter_targets(name), seed=300 + number)
    for number, (name, targets) in enumerate(HF_ADAPTER_TARGETS.items()):
        target = adapter_path(root, name, "hf")
        if not os.path.exists(os.path.join(target, "adapter_config.json")):
            torch.manual_seed(210 + number)
            config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False,
                                target_parameters=HF_ADAPTER_PARAMETERS.get(name))
            get_peft_model(hf(name), config).save_pretrained(target)
    target = adapter_path(root, "qwen3_moe", "attn")
    if not os.path.exists(os.path.join(target, "adapter_config.json")):
        torch.manual_seed(200)
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=ATTENTION, init_lora_weights=False)
        get_peft_model(hf("qwen3_moe"), config).save_pretrained(target)
    target = adapter_path(root, "qwen3_moe", "fused")
    if not os.path.exists(os.path.join(target, "adapter_config.json")):
        torch.manual_seed(201)  # peft on transformers 5 turns these into target_parameters on the fused experts
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=EXPERT, init_lora_weights=False)
        get_peft_model(hf("qwen3_moe"), config).save_pretrained(target)


# ---- the oracle (used by the pytest side) -------------------------------------------------------
_PER_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


def scaling_of(config: dict, path: str, r: int) -> float:
    """peft's scaling for the module at `path` with rank r: lora_alpha or its alpha_pattern entry, over r (or √r)."""
    alpha = config["lora_alpha"]
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):  # peft's get_pattern_key
            alpha = value
            break
    return alpha / r**0.5 if config.get("use_rslora") else alpha / r


def adapter_deltas(folder: str) -> dict:
    """HF module path -> scaling·B·A (fp32) of an adapter folder with plain LoRA (ranks read from the tensors)."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    assert not config.get("target_parameters")
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    deltas = {}
    for key, lora_a in tensors.items():
        if key.endswith(".lora_A.weight"):
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            lora_b = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[path] = (lora_b.double() @ lora_a.double()).float() * scaling_of(config, path, lora_a.shape[0])
    return deltas


def merge_into_hf(hf_model, deltas: dict) -> None:
    """Add each delta to the HF model's weight: per-expert paths into the fused expert tensors."""
    import torch

    with torch.no_grad():
        for path, delta in deltas.items():
            match = _PER_EXPERT.match(path)
            if match is None:
                hf_model.get_submodule(path).weight += delta
                continue
            experts, e, proj = hf_model.get_submodule(match["experts"]), int(match["e"]), match["proj"]
            if proj == "down_proj":
                experts.down_proj[e] += delta
            else:
                rows = delta.shape[0]
                start = 0 if proj == "gate_proj" else experts.gate_up_proj.shape[1] // 2
                experts.gate_up_proj[e, start : start + rows] += delta


def reference_gradients(checkpoint_folder: str, adapter_folder: str, batch: dict) -> tuple[float, dict]:
    """Loss and d loss / d (every A and B) of the HF model whose weights are W + scaling·B·A, per expert (fp32):
    the adapter's tensors are the leaves, the merged weights are built from them, the HF forward runs on those."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint_folder, dtype=torch.float32).eval()
    with open(os.path.join(adapter_folder, "adapter_config.json")) as f:
        config = json.load(f)
    leaves = {k: t.clone().requires_grad_() for k, t in load_file(os.path.join(adapter_folder, "adapter_model.safetensors")).items()}
    params = dict(model.named_parameters())
    weights = {}
    expert_deltas: dict = {}  # fused experts module -> {(expert, proj): delta}
    for key, lora_a in leaves.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        delta = (leaves[key.replace(".lora_A.", ".lora_B.")] @ lora_a) * scaling_of(config, path, lora_a.shape[0])
        match = _PER_EXPERT.match(path)
        if match is None:
            weights[f"{path}.weight"] = params[f"{path}.weight"] + delta
        else:
            expert_deltas.setdefault(match["experts"], {})[(int(match["e"]), match["proj"])] = delta
    for experts, deltas in expert_deltas.items():
        gate_up, down = params[f"{experts}.gate_up_proj"], params[f"{experts}.down_proj"]
        half = gate_up.shape[1] // 2
        zeros = gate_up.new_zeros(half, gate_up.shape[2])
        weights[f"{experts}.gate_up_proj"] = gate_up + torch.stack([
            torch.cat([deltas.get((e, "gate_proj"), zeros), deltas.get((e, "up_proj"), zeros)]) for e in range(gate_up.shape[0])
        ])
        weights[f"{experts}.down_proj"] = down + torch.stack([
            deltas.get((e, "down_proj"), torch.zeros_like(down[e])) for e in range(down.shape[0])
        ])
    loss = torch.func.functional_call(model, weights, args=(), kwargs=batch, strict=False).loss
    loss.backward()
    return loss.item(), {k: t.grad for k, t in leaves.items()}


def merged_reference(checkpoint_folder: str, adapter_folder: str):
    """The HF model (fp32) with the adapter merged per expert: what every per-expert LoRA must compute."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint_folder, dtype=torch.float32).eval()
    merge_into_hf(model, adapter_deltas(adapter_folder))
    return model


# ---- the worker ---------------------------------------------------------------------------------
RANK = int(os.environ.get("RANK", 0))


def run_case(case: Case, root: str, out: str, info: dict, tensors: dict) -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    import mcore_transformers.peft as mpeft
    from mcore_transformers import MCoreModelForCausalLM

    layout = LAYOUTS[case.layout]
    model = MCoreModelForCausalLM.from_pretrained(
        os.path.join(root, case.checkpoint), tp=layout["tp"], ep=layout["ep"], etp=layout["etp"], dtype=torch.float32
    )
    batch = make_inputs(model.config.vocab_size)
    folder = adapter_path(root, case.checkpoint, case.adapter)
    case_out = os.path.join(out, case.id)

    def logits(m):
        with torch.no_grad():
            return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach().clone()

    def adapted(peft_model):
        return sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)

    if case.kind == "hf-logits":
        peft_model = PeftModel.from_pretrained(model, folder, is_trainable=True)
        info["adapted"] = adapted(peft_model)
        tensors["logits"] = logits(peft_model)
        if case.adapter in ("fused", "hf"):  # read per expert, written back in the fused format it came in
            info["config"] = {k: getattr(peft_model.peft_config["default"], k) for k in ("target_modules", "rank_pattern")}
            mpeft.save_adapter(peft_model, os.path.join(case_out, "adapter"))
        if layout["tp"] == 1 and case.checkpoint not in EVAL_ONLY:  # (megatron refuses to train MoE with tp > 1 without sequence parallelism)
            peft_model.train()
            loss = peft_model(**batch).loss
            loss.backward()  # the adapters train: every routed expert that got tokens has gradients
            tensors["loss"] = loss.detach()
            info["no_grad"] = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is None)
            info["zero_grad"] = sorted(
                n for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None and not p.grad.any()
            )
            tensors["grads"] = {  # under the adapter's HF keys
                n.replace(".default.", "."): p.grad.detach().clone()
                for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None
            }

    elif case.kind == "export":
        torch.manual_seed(11 + RANK)  # different on each rank: the replicas must still agree
        if case.adapter == "tparams":  # target_parameters on the megatron model: per-expert slots of those tensors
            config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"], init_lora_weights=False,
                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        else:
            targets = ATTENTION if case.adapter == "attn" else EXPORT_TARGETS
            config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        info["adapted"] = adapted(peft_model)
        tensors["logits"] = logits(peft_model)
        mpeft.save_adapter(peft_model, os.path.join(case_out, "adapter"))

    elif case.kind == "merge":
        merge_case(PeftModel.from_pretrained(model, folder), logits, case_out, info, tensors)

    elif case.kind == "error-target-parameters":  # a parameter that is no stacked expert tensor
        try:
            get_peft_model(model, LoraConfig(r=R, target_modules=["q_proj"], target_parameters=["self_attn.q_proj.weight"]))
        finally:
            info["lora_layers"] = [n for n, m in model.named_modules() if "lora" in type(m).__name__.lower()]
    elif case.kind == "error-experts-as-modules":
        # "all-linear" adapts what it does on the HF model, where the stacked experts are no nn.Linear: attention only
        peft_model = get_peft_model(model, LoraConfig(r=R, target_modules="all-linear"))
        info["all_linear"] = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapted(peft_model)})
        peft_model.unload()
        get_peft_model(model, LoraConfig(r=R, target_modules=["q_proj", "down_proj"]))
    elif case.kind == "error-no-per-expert-names":
        peft_model = get_peft_model(model, LoraConfig(r=R, target_modules=["q_proj", "gate_proj"]))
        try:
            mpeft.save_adapter(peft_model, os.path.join(case_out, "adapter"))
        finally:
            info["files_after"] = sorted(f for f in os.listdir(case_out) if not f.startswith("rank"))
    else:
        raise ValueError(f"unknown case kind {case.kind}")


def main() -> None:
    root, out = sys.argv[1:3]
    only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None
    import torch.distributed as dist

    from mcore_transformers import destroy_parallel_state

    for layout in LAYOUTS:
        for case in [c for c in CASES if c.layout == layout and (not only or c.id in only)]:
            record_case(case, run_case, root, out)
        if dist.is_initialized():
            destroy_parallel_state()
    finish(out)


if __name__ == "__main__":
    main()
