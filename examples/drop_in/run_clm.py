"""Causal-LM fine-tuning the way transformers' examples/pytorch/language-modeling/run_clm.py does it, with the
calls it makes on the model and the Trainer, in its order and with its keyword arguments (a text file as data;
accuracy computed inline instead of `evaluate`, which fetches its metric from the Hub).

It is a transformers script: it imports AutoModelForCausalLM and Trainer from transformers. To run it on
megatron-core, change only those two imports (tests/test_drop_in.py does exactly that):

    from mcore_transformers import MCoreModelForCausalLM as AutoModelForCausalLM
    from mcore_transformers import MCoreTrainer as Trainer

    python examples/drop_in/run_clm.py --model_name_or_path DIR --train_file data.txt --output_dir out \\
        --do_train --do_eval --block_size 32 --max_steps 4
    MCORE_TRANSFORMERS_TP=2 torchrun --nproc_per_node=2 examples/drop_in/run_clm.py ...   # with the swapped imports
"""

import logging
import math
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

import torch
from datasets import load_dataset

import transformers
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser, TrainingArguments, default_data_collator, set_seed
from transformers import AutoModelForCausalLM
from transformers import Trainer

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str
    cache_dir: Optional[str] = None
    model_revision: str = "main"
    token: Optional[str] = None
    trust_remote_code: bool = False
    use_fast_tokenizer: bool = True
    dtype: Optional[str] = field(default=None, metadata={"choices": ["auto", "bfloat16", "float16", "float32"]})


@dataclass
class DataTrainingArguments:
    train_file: str
    validation_split_percentage: int = 25
    block_size: Optional[int] = None
    keep_linebreaks: bool = True


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    data_files = {"train": data_args.train_file}
    raw_datasets = load_dataset("text", data_files=data_files, cache_dir=model_args.cache_dir, token=model_args.token,
                                keep_linebreaks=data_args.keep_linebreaks)
    raw_datasets["validation"] = load_dataset(
        "text", data_files=data_files, split=f"train[:{data_args.validation_split_percentage}%]",
        cache_dir=model_args.cache_dir, token=model_args.token, keep_linebreaks=data_args.keep_linebreaks,
    )
    raw_datasets["train"] = load_dataset(
        "text", data_files=data_files, split=f"train[{data_args.validation_split_percentage}%:]",
        cache_dir=model_args.cache_dir, token=model_args.token, keep_linebreaks=data_args.keep_linebreaks,
    )

    config_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **config_kwargs)
    tokenizer_kwargs = {
        "cache_dir": model_args.cache_dir,
        "use_fast": model_args.use_fast_tokenizer,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **tokenizer_kwargs)

    dtype = model_args.dtype if model_args.dtype in ["auto", None] else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        from_tf=bool(".ckpt" in model_args.model_name_or_path),
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        dtype=dtype,
    )

    # Resize only when the tokenizer outgrew the embedding matrix (run_clm's rule).
    embedding_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_size:
        model.resize_token_embeddings(len(tokenizer))

    column_names = list(raw_datasets["train"].features)
    text_column_name = "text" if "text" in column_names else column_names[0]

    def tokenize_function(examples):
        return tokenizer(examples[text_column_name])

    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized_datasets = raw_datasets.map(tokenize_function, batched=True, remove_columns=column_names)
    block_size = min(data_args.block_size or 1024, config.max_position_embeddings)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = (len(concatenated[list(examples.keys())[0]]) // block_size) * block_size
        result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    with training_args.main_process_first(desc="grouping texts together"):
        lm_datasets = tokenized_datasets.map(group_texts, batched=True)
    train_dataset = lm_datasets["train"]
    eval_dataset = lm_datasets["validation"]

    def preprocess_logits_for_metrics(logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        labels = labels[:, 1:].reshape(-1)
        preds = preds[:, :-1].reshape(-1)
        valid = labels != -100
        return {"accuracy": float((preds[valid] == labels[valid]).mean())}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
    )

    if training_args.do_train:
        train_result = trainer.train()
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        try:
            perplexity = math.exp(metrics["eval_loss"])
        except OverflowError:
            perplexity = float("inf")
        metrics["perplexity"] = perplexity
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
    trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
