"""The RL loop against a real vLLM engine: `torchrun --nproc_per_node=2 sync_worker.py MODE FOLDER OUT [PORT]`.

MODE "group": rank 0 starts an engine (its worker in its own process, vLLM's default); two rounds of one
MCoreTrainer step at tp=2 followed by `update_weights`; after each, vLLM's greedy tokens and the mcore model's
`generate` on fixed prompts. Then the refusals (an engine for another model, an engine on rank 1, a bucket
smaller than a tensor), each followed by a generation that shows the engine kept its weights; then LoRA
through `update_adapter`.
MODE "remote": the engine lives in another process (tests_vllm/remote_host.py, connected on PORT); two rounds.
MODE "direct" (one process): the engine's worker in this process, tensors handed over by reference.
Rank 0 writes OUT (JSON): per round the tokens of both sides and the sync report; the refusals' messages.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = [[5, 17, 99, 250, 42, 7], [64, 65, 66, 67, 68], [900, 3, 401, 77]]
NEW_TOKENS = 10
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=256, seed=0)


def training_data():
    import torch

    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 1000, (8, 24), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in rows]


def mcore_tokens(model) -> list:
    import torch

    tokens = []
    for prompt in PROMPTS:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
        tokens.append(out[0, len(prompt):].tolist())
    return tokens


def vllm_tokens(llm, lora_request=None) -> list:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, lora_request=lora_request)
    return [list(out.outputs[0].token_ids) for out in outs]


def train_step(model) -> None:
    from transformers import TrainingArguments

    from mcore_transformers import MCoreTrainer

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=1,
                             learning_rate=5e-3, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    MCoreTrainer(model=model, args=args, train_dataset=training_data()).train()
    model.eval()


def _error(call) -> dict:
    try:
        call()
    except Exception as err:  # noqa: BLE001 - recorded, judged by the test
        return {"type": type(err).__name__, "message": str(err)}
    return {"type": None, "message": None}


def main() -> None:
    import torch
    import torch.distributed as dist
    from transformers.utils import logging

    logging.set_verbosity_error()
    from mcore_transformers import MCoreModelForCausalLM
    from mcore_transformers.vllm import RemoteEngine, start_engine, update_adapter, update_weights

    mode, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
    tp = 1 if mode == "direct" else 2
    model = MCoreModelForCausalLM.from_pretrained(folder, dtype=torch.float32, tp=tp)
    rank = dist.get_rank()
    record: dict = {"rounds": []}
    if mode == "remote":
        engine = RemoteEngine(port=int(sys.argv[4])) if rank == 0 else None
    else:
        kwargs = dict(ENGINE, enable_lora=True, max_lora_rank=8, max_loras=1) if mode == "group" else dict(ENGINE)
        if mode == "direct":
            kwargs["distributed_executor_backend"] = "uni"
        engine = start_engine(folder, **kwargs) if rank == 0 else None
    try:
        for _ in range(2):
            train_step(model)
            report = update_weights(model, engine, bucket_bytes=4 * 2**20)
            entry = {"mcore": mcore_tokens(model), "report": {"transport": report.transport, "buckets": report.buckets,
                                                              "bytes": report.bytes, "engine": report.engine}}
            if rank == 0 and mode != "remote":
                entry["vllm"] = vllm_tokens(engine)
            record["rounds"].append(entry)
        if mode == "group":
            before = vllm_tokens(engine) if rank == 0 else None
            other = start_engine(os.environ["OTHER_MODEL"], **ENGINE) if rank == 0 else None
            record["errors"] = {
                "other-model": _error(lambda: update_weights(model, other)),
                "engine-on-rank-1": _error(lambda: update_weights(model, engine if rank == 0 else RemoteEngine())),
                "small-bucket": _error(lambda: update_weights(model, engine, bucket_bytes=2**16)),
            }
            record["kept"] = vllm_tokens(engine) == before if rank == 0 else None
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(0)
            peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
            request = update_adapter(peft_model, engine)
            record["adapter"] = {"mcore": mcore_tokens(peft_model)}
            if rank == 0:
                record["adapter"]["vllm"] = vllm_tokens(engine, request)
    except Exception:  # noqa: BLE001 - the test reports it
        record["crashed"] = traceback.format_exc()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main()
