"""Chat-style generation with a tokenizer's chat template, offline, on a tiny random model.

    python examples/chat_generate.py
    torchrun --nproc_per_node=2 examples/chat_generate.py --tp 2
    torchrun --nproc_per_node=2 examples/chat_generate.py --pp 2

The script writes (once) a tiny Llama checkpoint plus a word-level tokenizer trained on a few sentences,
with a chat template, into one folder, then uses the ordinary transformers calls on it:
`AutoTokenizer.apply_chat_template`, `model.generate(..., streamer=TextStreamer(...))`, `batch_decode`.
The model is random, so the replies are random words; the point is the API, and that the ids equal
what transformers' own model generates from the same folder (checked at the end).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

SENTENCES = [
    "hello how are you today",
    "i am fine thank you and you",
    "what is the weather like",
    "it is sunny and warm outside",
    "tell me a story about a cat",
    "the cat sat on the mat and slept",
    "can you help me write some code",
    "sure what do you want to build",
    "a small model that talks",
]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {{ eos_token }} "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_demo_folder(folder: str) -> None:
    """A tiny Llama checkpoint and its chat tokenizer in `folder` (written once; `ready` marks completion)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mcore_transformers.tools.tiny import make_tiny_checkpoint

    if os.path.exists(os.path.join(folder, "ready")):
        return
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="left",  # decoder-only batches are left-padded
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    make_tiny_checkpoint(
        folder, "llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    tokenizer.save_pretrained(folder)
    open(os.path.join(folder, "ready"), "w").close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/mcore_chat_demo")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        build_demo_folder(args.folder)
    while not os.path.exists(os.path.join(args.folder, "ready")):  # the other ranks wait for rank 0
        time.sleep(0.2)

    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from mcore_transformers import MCoreModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = MCoreModelForCausalLM.from_pretrained(args.folder, tp=args.tp, pp=args.pp, dtype=torch.float32)

    def say(*text):
        if rank == 0:
            print(*text, flush=True)

    # One conversation, streamed as it is generated (the streamer prints on rank 0 only).
    chat = [
        {"role": "system", "content": "you help me write some code"},
        {"role": "user", "content": "hello how are you today"},
    ]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    say("prompt:", tokenizer.decode(inputs["input_ids"][0]))
    if rank == 0:
        print("reply (streamed):", end=" ", flush=True)
    streamed = model.generate(
        **inputs, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    )

    # A batch of conversations of different lengths (left-padded), sampled, two replies each.
    chats = [chat, [{"role": "user", "content": "tell me a story about a cat"}]]
    batch = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
    )
    torch.manual_seed(0)
    sampled = model.generate(
        **batch, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.8, top_p=0.9,
        num_return_sequences=2,
    )
    prompt_len = batch["input_ids"].shape[1]
    for i, reply in enumerate(tokenizer.batch_decode(sampled[:, prompt_len:], skip_special_tokens=True)):
        say(f"sampled reply {i} (conversation {i // 2}): {reply}")

    # Beam search on the same batch.
    beams = model.generate(**batch, max_new_tokens=args.max_new_tokens, num_beams=3)
    for i, reply in enumerate(tokenizer.batch_decode(beams[:, prompt_len:], skip_special_tokens=True)):
        say(f"beam reply (conversation {i}): {reply}")

    # transformers' own model from the same folder generates the same ids (fp32, greedy and beams).
    if rank == 0:
        hf = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
        same = torch.equal(hf.generate(**inputs, max_new_tokens=args.max_new_tokens), streamed)
        same &= torch.equal(hf.generate(**batch, max_new_tokens=args.max_new_tokens, num_beams=3), beams)
        print("identical to transformers:", bool(same))
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
