"""python serve_worker.py JOBS.json OUT.json: one vLLM engine per job, one after another in this process.

A job: {"name", "folder", "dtype", "lora": adapter folder or null}. Each engine is started with the job's dtype
("float32" to compare with transformers exactly, "auto": the saved config.json decides), generates greedily from
PROMPTS (token ids) and, with a LoRA, also through the adapter.
OUT.json: {name: {"dtype", "architecture", "tokens", "lora_tokens"}} or {name: {"error": ...}}.
"""

import gc
import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = [[5, 17, 99, 250, 42, 7, 300, 12], [64, 65, 66, 67, 68], [900, 3, 401, 77, 510, 11, 2, 1000, 23]]
NEW_TOKENS = 16


def serve(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    kwargs = dict(enable_lora=True, max_lora_rank=8, max_loras=1) if job.get("lora") else {}
    llm = LLM(model=job["folder"], dtype=job["dtype"], enforce_eager=True, max_model_len=256, seed=0, **kwargs)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in PROMPTS]
        record = {
            "dtype": str(llm.llm_engine.model_config.dtype).replace("torch.", ""),
            "architecture": llm.llm_engine.model_config.architectures[0],
            "tokens": [list(out.outputs[0].token_ids) for out in llm.generate(prompts, params)],
        }
        if job.get("lora"):
            request = LoRARequest("adapter", 1, job["lora"])
            outs = llm.generate(prompts, params, lora_request=request)
            record["lora_tokens"] = [list(out.outputs[0].token_ids) for out in outs]
        return record
    finally:
        del llm
        gc.collect()


def main() -> None:
    jobs, out = json.load(open(sys.argv[1])), sys.argv[2]
    results = {}
    for job in jobs:
        try:
            results[job["name"]] = serve(job)
        except Exception as err:  # noqa: BLE001 - the test reports it
            results[job["name"]] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
