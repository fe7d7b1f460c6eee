"""The process that drives a vLLM engine for tests_vllm/sync_worker.py's "remote" mode:
`python remote_host.py FOLDER PORT OUT`. Two rounds: take one weight update from the trainer (its store on PORT),
then generate greedily from the fixed prompts; OUT (JSON): the tokens and the engine's report of each round."""

import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sync_worker  # noqa: E402


def main() -> None:
    from mcore_transformers.vllm import serve_weight_updates, start_engine

    folder, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    record = {"rounds": []}
    try:
        llm = start_engine(folder, **sync_worker.ENGINE)
        for _ in range(2):
            reports = serve_weight_updates(llm, "127.0.0.1", port)
            record["rounds"].append({"vllm": sync_worker.vllm_tokens(llm), "reports": reports})
    except Exception:  # noqa: BLE001 - the test reports it
        record["crashed"] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
