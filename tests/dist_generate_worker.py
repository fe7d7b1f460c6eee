"""generate() cases under one or more layouts in one process launch; results per rank as JSON.

    python tests/dist_generate_worker.py OUT CHECKPOINT_ROOT tp1
    torchrun --nproc_per_node=2 tests/dist_generate_worker.py OUT CHECKPOINT_ROOT tp2,pp2,pp2vpp2,tp2sp

Layouts run one after another (the parallel state is torn down in between). Each case's token ids,
or the error it raised, go to OUT/<layout>/rank<r>.json; tests/test_generate.py compares them with
transformers' generate on the same checkpoint. The case table below is shared with the test.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

# layout name -> from_pretrained kwargs (+ world size).
LAYOUTS = {
    "tp1": dict(world=1, tp=1, pp=1),
    "tp2": dict(world=2, tp=2, pp=1),
    "pp2": dict(world=2, tp=1, pp=2),
    "pp2vpp2": dict(world=2, tp=1, pp=2, vpp=2),
    "tp2sp": dict(world=2, tp=2, pp=1, sequence_parallel=True),
    "ep2": dict(world=2, ep=2),  # experts split over two data-parallel replicas
}
MAIN_LAYOUTS = ("tp1", "tp2", "pp2")  # every case runs here; the others run the CORE cases

CHECKPOINTS = {  # name -> (model_type, overrides) for mcore_transformers.tools.tiny.make_tiny_checkpoint
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),  # sliding window 7: decoding runs past it
    "qwen2": ("qwen2", {}),  # qkv bias
    "qwen3": ("qwen3", {}),  # qk norm, head_dim 24
    # 3 KV heads: tp=2 repeats each into 2 query groups (6 in all), the cache holds the copies
    "qwen2-kv3": ("qwen2", {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 48}),
    "phi3": ("phi3", {}),  # packed qkv / gate_up, window 7, longrope: long factors once positions pass 8
    "smollm3": ("smollm3", {}),  # no rotary and a window of 5 on every second layer (megatron's own attention forward)
    "ernie4_5": ("ernie4_5", {}),  # interleaved rotary, biases everywhere
    "glm4": ("glm4", {}),  # post-sublayer norms, interleaved rotary on half of each head
    "olmo2": ("olmo2", {}),  # only post-sublayer norms, q/k norms over all heads
    "olmo3": ("olmo3", {}),  # + a window of 5 on three layers of four: decoding runs past it
    "gemma2": ("gemma2", {}),  # soft-capped attention scores (eager core) and logits, (1 + w) norms, window 5
    "gemma3_text": ("gemma3_text", {}),  # q/k norms, one rotary table per layer type
    "qwen3_moe": ("qwen3_moe", {}),  # routed experts
    "deepseek_v3": ("deepseek_v3", {}),  # multi-latent attention, shared experts
    "gpt_oss": ("gpt_oss", {}),  # attention sinks, alternating sliding windows, expert biases
    "glm4_moe": ("glm4_moe", {}),  # partial rotate-half rotary, q/k norms, group-limited sigmoid routing
    "ernie4_5_moe": ("ernie4_5_moe", {}),  # softmax routing chosen with a score-correction bias, dense first layer
    "minimax_m2": ("minimax_m2", {}),  # q/k norms over all heads, partial rotary, sigmoid routing with a bias
    "granite": ("granite", {}),  # scaled embeddings, residual branches, scores and logits
    "granitemoe": ("granitemoe", {}),
    # LayerNorms with biases, SparseMixer top-2 routing, window 7, q/k/v/o and LM head biases, longrope (its mscale)
    "phimoe": ("phimoe", {}),
}

PAD = 0
SAMPLING_SEED = 1234  # rank 0's seed; other ranks are seeded differently on purpose
SAMPLING = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3)

# name -> (checkpoint, prompts, generate kwargs, sampled?). Prompts: "single" (1 × 7 tokens) or
# "padded" (3 prompts of 9, 6 and 4 tokens, left-padded with PAD).
CASES: dict[str, tuple] = {
    "greedy-single": ("llama", "single", dict(max_new_tokens=24), False),
    "greedy-padded-llama": ("llama", "padded", dict(max_new_tokens=24), False),
    "greedy-padded-mistral": ("mistral", "padded", dict(max_new_tokens=24), False),
    "greedy-padded-qwen2": ("qwen2", "padded", dict(max_new_tokens=24), False),
    "greedy-padded-qwen3": ("qwen3", "padded", dict(max_new_tokens=24), False),
    "greedy-padded-kv3": ("qwen2-kv3", "padded", dict(max_new_tokens=24), False),
    "greedy-single-phi3": ("phi3", "single", dict(max_new_tokens=24), False),  # 7 prompt tokens: short, then long
    "greedy-padded-phi3": ("phi3", "padded", dict(max_new_tokens=24), False),
    "greedy-padded-smollm3": ("smollm3", "padded", dict(max_new_tokens=24), False),
    "greedy-padded-ernie4_5": ("ernie4_5", "padded", dict(max_new_tokens=24), False),
    "greedy-padded-glm4": ("glm4", "padded", dict(max_new_tokens=24), False),
    "greedy-padded-olmo2": ("olmo2", "padded", dict(max_new_tokens=24), False),
    "greedy-padded-olmo3": ("olmo3", "padded", dict(max_new_tokens=24), False),
    "greedy-padded-gemma2": ("gemma2", "padded", dict(max_new_tokens=24), False),
    "greedy-padded-gemma3": ("gemma3_text", "padded", dict(max_new_tokens=24), False),
    "beam": ("llama", "padded", dict(max_new_tokens=12, num_beams=3, num_return_sequences=2), False),
    "beam-sample": ("llama", "padded", dict(max_new_tokens=10, num_beams=2, **SAMPLING), True),
    "sample": ("llama", "padded", dict(max_new_tokens=16, num_return_sequences=2, **SAMPLING), True),
    "no-cache": ("llama", "padded", dict(max_new_tokens=12, use_cache=False), False),
    # Assisted decoding: candidates checked several tokens at a time, rejected ones cropped from the cache.
    "assisted-lookup": ("llama", "repeating", dict(max_new_tokens=24, prompt_lookup_num_tokens=3), False),
    "assisted-draft": ("llama", "single", dict(max_new_tokens=24, num_assistant_tokens=4), False),  # + assistant_model
    "stopping-criteria": ("llama", "padded", dict(max_new_tokens=30), False),  # + StopAtLength(prompt + 7)
    "eos": ("llama", "padded", dict(max_new_tokens=24), False),  # eos = a token greedy-padded-llama emits
    "after-errors": ("llama", "padded", dict(max_new_tokens=24), False),  # the ranks are still in step
    "moe-greedy-single": ("qwen3_moe", "single", dict(max_new_tokens=16), False),
    "moe-greedy-padded": ("qwen3_moe", "padded", dict(max_new_tokens=16), False),
    "mla-greedy-padded": ("deepseek_v3", "padded", dict(max_new_tokens=16), False),
    "sinks-greedy-padded": ("gpt_oss", "padded", dict(max_new_tokens=16), False),
    "greedy-padded-glm4_moe": ("glm4_moe", "padded", dict(max_new_tokens=16), False),
    "greedy-padded-ernie4_5_moe": ("ernie4_5_moe", "padded", dict(max_new_tokens=16), False),
    "greedy-padded-minimax_m2": ("minimax_m2", "padded", dict(max_new_tokens=16), False),
    "greedy-padded-granite": ("granite", "padded", dict(max_new_tokens=24), False),
    "greedy-padded-granitemoe": ("granitemoe", "padded", dict(max_new_tokens=16), False),
    "greedy-padded-phimoe": ("phimoe", "padded", dict(max_new_tokens=16), False),
    "greedy-single-phimoe": ("phimoe", "single", dict(max_new_tokens=8), False),  # 7 prompt tokens: past the switch
    # Expert parallelism: each replica its own prompts and length (rank r: seed 7 + r, 6 + 6·r new tokens).
    "moe-per-rank": ("qwen3_moe", "padded", {}, False),
}

# Cases whose generation crosses Phi-3's longrope switch (long factors once a position passes
# original_max_position_embeddings; PhiMoE's generate drops its cache there too). transformers' generate then drops
# its cache to recompute the sequence with the new factors; 5.19.0 drops the cache but still feeds only the last token
# (a no-cache forward of one token: other tokens than its own model gives); 5.24.0 recomputes the whole sequence. The
# oracle for these is transformers' forward over the whole sequence at every step (generate without cache), equal to
# 5.24's.
RECOMPUTED_BY_TRANSFORMERS = {"greedy-single-phi3", "greedy-padded-phi3", "greedy-single-phimoe"}
MOE_CASES = ("moe-greedy-single", "moe-greedy-padded")
TP1_CASES = ("mla-greedy-padded", "sinks-greedy-padded")
CORE_CASES = ("greedy-padded-llama", "beam", "sample")
ERROR_CASES = ("prompt-too-long", "cache-too-big", "foreign-cache", "cache-wrong-rows", "cache-not-passed")
DRAFT_CHECKPOINT = "mistral"  # assisted-draft's assistant: another model over the same vocabulary


def cases_for(layout: str) -> list[str]:
    """The cases run in the main loop ("after-errors" runs after the bad-input cases)."""
    if layout == "ep2":
        return [*MOE_CASES, "moe-per-rank"]
    special = ("after-errors", "moe-per-rank", *MOE_CASES, *TP1_CASES)
    chosen = [c for c in CASES if c not in special] if layout in MAIN_LAYOUTS else list(CORE_CASES)
    return chosen + list(MOE_CASES) + (list(TP1_CASES) if layout == "tp1" else [])


def per_rank_settings(rank: int) -> tuple[int, int]:
    """("moe-per-rank") the prompt seed and max_new_tokens of a rank."""
    return 7 + rank, 6 + 6 * rank


def make_prompts(kind: str, seed: int = 7):
    """(input_ids, attention_mask) for a prompt kind, the same in every process."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if kind == "repeating":  # n-grams that recur, so prompt lookup proposes candidates
        part = torch.randint(3, 250, (1, 5), generator=generator)
        ids = torch.cat([part, torch.randint(3, 250, (1, 3), generator=generator), part], 1)
        return ids, torch.ones_like(ids)
    if kind == "single":
        ids = torch.randint(3, 250, (1, 7), generator=generator)
        return ids, torch.ones_like(ids)
    lengths = [9, 6, 4]
    ids = torch.randint(3, 250, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, max(lengths) - length :] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def generate_kwargs(name: str, eos: int | None = None, root: str | None = None) -> dict:
    """The generate() kwargs of a case (the same for mcore and the transformers oracle)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAtLength(StoppingCriteria):
        def __init__(self, length: int):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    kwargs = dict(CASES[name][2], pad_token_id=PAD, eos_token_id=eos)
    if name == "stopping-criteria":
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopAtLength(9 + 7)])
    if name == "assisted-draft":
        kwargs["assistant_model"] = draft_model(root)
    return kwargs


_DRAFTS: dict = {}


def draft_model(root: str):
    """transformers' model of DRAFT_CHECKPOINT: the assistant whose candidates the target partly rejects."""
    import torch
    from transformers import AutoModelForCausalLM

    if root not in _DRAFTS:
        folder = os.path.join(root, DRAFT_CHECKPOINT)
        _DRAFTS[root] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return _DRAFTS[root]


def count_cache_rollbacks():
    """Patch MCoreKVCache.crop to count the calls that dropped tokens; returns the counter (a list of one int)."""
    from mcore_transformers.model.cache import MCoreKVCache

    counter = [0]
    crop = MCoreKVCache.crop

    def counting_crop(self, tokens):
        before = self.get_seq_length()
        crop(self, tokens)
        counter[0] += self.get_seq_length() < before

    MCoreKVCache.crop = counting_crop
    return counter


def build_checkpoints(root: str) -> None:
    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    for name, (model_type, overrides) in CHECKPOINTS.items():
        folder = os.path.join(root, name)
        if not os.path.exists(os.path.join(folder, "config.json")):
            make_tiny_checkpoint(folder, model_type, **overrides)


# ---------------------------------------------------------------------------------------------------
def _error(err: BaseException) -> dict:
    return {"type": type(err).__name__, "mro": [c.__name__ for c in type(err).__mro__], "message": str(err)}


def _manual_cache_loop(model, ids, mask) -> dict:
    """forward(use_cache=True), then 6 one-token steps (the cache grows) vs one forward over everything."""
    import torch

    with torch.no_grad():
        start = (mask.cumsum(-1) - 1).clamp(min=0)  # HF's positions for left-padded rows
        out = model(input_ids=ids, attention_mask=mask, position_ids=start, use_cache=True)
        cache, seq, full_mask = out.past_key_values, ids, mask
        for _ in range(6):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(token)], 1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
            out = model(input_ids=token, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                        use_cache=True)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        full = model(input_ids=seq, attention_mask=full_mask, position_ids=positions)
        last_kept = model(input_ids=seq, attention_mask=full_mask, position_ids=positions, logits_to_keep=1)
    return {
        "cached_tokens": cache.get_seq_length(),
        "max_diff": (out.logits[:, -1] - full.logits[:, -1]).abs().max().item(),
        "keep_diff": (last_kept.logits[:, -1] - full.logits[:, -1]).abs().max().item(),
        "keep_shape": list(last_kept.logits.shape),
    }


def _run_layout(layout: str, root: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import DynamicCache
    from transformers.generation.streamers import BaseStreamer

    from mcore_transformers import MCoreModelForCausalLM, destroy_parallel_state
    from mcore_transformers.model.fast_layers import RotaryCachedSelfAttention, SdpaDotProductAttention
    from mcore_transformers.model.layers import SoftcappedDotProductAttention

    sizes = {k: v for k, v in LAYOUTS[layout].items() if k != "world"}
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    results: dict[str, dict] = {}
    models: dict[str, MCoreModelForCausalLM] = {}

    def model_for(checkpoint: str) -> MCoreModelForCausalLM:
        if checkpoint not in models:
            models[checkpoint] = MCoreModelForCausalLM.from_pretrained(os.path.join(root, checkpoint), **sizes)
            # The decode path under test (GQA families): keys cached after rotary, torch sdpa at inference (soft-capped
            # scores: the eager core).
            attention = models[checkpoint].chunks[0].decoder.layers[0].self_attention
            if checkpoint != "deepseek_v3":  # multi-latent attention: megatron's MLA with our core
                assert isinstance(attention, RotaryCachedSelfAttention), type(attention)
                core = SoftcappedDotProductAttention if checkpoint == "gemma2" else SdpaDotProductAttention
                assert isinstance(attention.core_attention, core), type(attention.core_attention)
        return models[checkpoint]

    def record(name: str, fn) -> None:
        try:
            results[name] = fn()
        except Exception as err:  # noqa: BLE001 - the test reports it
            results[name] = {"error": _error(err), "traceback": traceback.format_exc()}

    class RecordingStreamer(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = 0, False

        def put(self, value):
            self.puts += 1

        def end(self):
            self.ended = True

    for name in cases_for(layout):
        checkpoint, kind, _, sampled = CASES[name]

        def run(name=name, checkpoint=checkpoint, kind=kind, sampled=sampled):
            model = model_for(checkpoint)
            ids, mask = make_prompts(kind)
            if name == "moe-per-rank":
                seed, new_tokens = per_rank_settings(rank)
                ids, mask = make_prompts(kind, seed)
                out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=PAD, eos_token_id=None)
                return {"ids": out.tolist(), "seed": seed, "new_tokens": new_tokens}
            eos = None
            if name == "eos":  # a token the greedy run emits at step 5 of row 0: rows stop at different times
                eos = results["greedy-padded-llama"]["ids"][0][ids.shape[1] + 5]
            kwargs = generate_kwargs(name, eos, root)
            streamer = RecordingStreamer() if name == "greedy-padded-llama" else None
            if sampled:  # deliberately different seeds: generate() must sample with rank 0's state
                torch.manual_seed(SAMPLING_SEED if rank == 0 else SAMPLING_SEED + 1000 + rank)
            rollbacks_before = ROLLBACKS[0]
            out = model.generate(ids, attention_mask=mask, streamer=streamer, **kwargs)
            entry = {"ids": out.tolist(), "eos": eos, "rollbacks": ROLLBACKS[0] - rollbacks_before}
            if streamer is not None:
                entry["streamed"] = {"puts": streamer.puts, "ended": streamer.ended}
            return entry

        record(name, run)

    ids, mask = make_prompts("padded")
    if layout != "ep2":
        record("manual-cache-loop", lambda: _manual_cache_loop(model_for("llama"), ids, mask))

    if layout in MAIN_LAYOUTS:

        def bad(name: str):
            def attempt():
                model = model_for("llama")
                if name == "prompt-too-long":
                    long_ids = torch.randint(3, 250, (1, 300), generator=torch.Generator().manual_seed(1))
                    model.generate(long_ids, max_new_tokens=2, pad_token_id=PAD)
                elif name == "cache-too-big":
                    model.generate(ids, attention_mask=mask, max_new_tokens=10**9, num_beams=4, pad_token_id=PAD)
                elif name == "foreign-cache":
                    model.generate(ids, attention_mask=mask, max_new_tokens=2, past_key_values=DynamicCache(), pad_token_id=PAD)
                elif name == "cache-wrong-rows":
                    cache = model.new_kv_cache(batch_size=2, max_length=32)
                    model.generate(ids, attention_mask=mask, max_new_tokens=2, past_key_values=cache, pad_token_id=PAD)
                elif name == "cache-not-passed":  # a transformers release that stops handing the cache to forward
                    prepare = model.prepare_inputs_for_generation

                    def without_cache(*args, **kwargs):
                        inputs = prepare(*args, **kwargs)
                        inputs.pop("cache", None), inputs.pop("past_key_values", None)
                        return inputs

                    model.prepare_inputs_for_generation = without_cache
                    try:
                        model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
                    finally:
                        del model.prepare_inputs_for_generation
                return {"error": None}

            return attempt

        for name in ERROR_CASES:
            record(name, bad(name))
        after = generate_kwargs("after-errors")
        record("after-errors", lambda: {"ids": model_for("llama").generate(ids, attention_mask=mask, **after).tolist()})

    os.makedirs(os.path.join(out, layout), exist_ok=True)
    with open(os.path.join(out, layout, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    models.clear()
    if dist.is_initialized():
        dist.barrier()
    destroy_parallel_state()


ROLLBACKS = [0]


def main() -> None:
    global ROLLBACKS
    ROLLBACKS = count_cache_rollbacks()
    out, root, layouts = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    for layout in layouts:
        _run_layout(layout, root, out)


if __name__ == "__main__":
    main()
