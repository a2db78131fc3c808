"""Instruction data for causal LMs: instruction / input / output records, the prompt template, tokenisation with
the prompt masked out of the loss, a padding collator (left or right), and the offline stand-ins (Rotten Tomatoes
snippets cast as instructions, a byte-level BPE tokenizer trained on them).

Each tokenised example has `input_ids` = prompt + response + EOS and `labels` = -100 over the prompt, then the
response tokens and EOS: only response tokens count, and `per_example_loss` averages them per example, so an
example's loss (and, after clipping, its gradient) is bounded whatever its length. The recipes import this file
as a sibling module; it uses only public libraries, never `peft_lalora` internals.
"""

from __future__ import annotations

import json
import logging
import os

import data
import datasets
import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
FIELDS = ("instruction", "input", "output")
# Alpaca's template: the prompt ends with the response header; the response follows it directly.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
DATA_FORMAT = (
    'Instruction records `{"instruction", "input", "output"}` (Alpaca style). The prompt is '
    "Alpaca's template (with or without its `### Input:` block) ending in `### Response:\\n`; the target "
    "is the output followed by the end-of-sequence token. Only the response tokens count in the loss, "
    "averaged over each example's own response tokens."
)
RT_INSTRUCTION = "Is this movie review fresh or rotten? Answer with one word."


def format_prompt(record: dict) -> str:
    """The prompt of a record (Alpaca's template; the `### Input:` block only when `input` is not empty)."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def load_instructions(
    source: str, *, config_name: str | None = None, split: str = "train", columns: tuple = FIELDS
) -> datasets.Dataset:
    """
    Instruction records from a local `.json` / `.jsonl` file (a list of objects, or one object per line) or a
    `datasets` name (`split` of it). `columns` names the instruction, input and output columns, which are renamed
    to `instruction`, `input` (empty when the column is missing) and `output`; other columns are kept (a client
    or category column, for instance).
    """
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
        stripped = text.lstrip()
        rows = (
            json.loads(text)
            if stripped.startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"`dataset` {source!r} must hold a JSON list of objects or one JSON object per line.")
        keys = list(dict.fromkeys(k for r in rows for k in r))
        dataset = datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})
    else:
        dataset = datasets.load_dataset(source, config_name, split=split)
    instruction, input_column, output = columns
    for name in (instruction, output):
        if name not in dataset.column_names:
            raise ValueError(
                f"the instruction data must have a {name!r} column, got {dataset.column_names}. Name "
                "the columns with --instruction_column / --input_column / --output_column."
            )
    if input_column not in dataset.column_names:
        dataset = dataset.add_column("input", [""] * len(dataset))
        input_column = "input"
    renames = {old: new for old, new in zip((instruction, input_column, output), FIELDS) if old != new}
    dataset = dataset.remove_columns([new for new in renames.values() if new in dataset.column_names])
    dataset = dataset.rename_columns(renames) if renames else dataset
    return dataset.map(lambda r: {"input": r["input"] or ""})


def rotten_tomatoes_instructions(test_size: int = 1000) -> datasets.DatasetDict:
    """The offline Rotten Tomatoes snippets (`data.load_rotten_tomatoes`, same fixed test split) as instructions:
    "fresh or rotten?" with the snippet as input and the word as output; `movie` and `sentiment` kept."""
    words = {0: "rotten", 1: "fresh"}

    def cast(split: datasets.Dataset) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "instruction": [RT_INSTRUCTION] * len(split),
                "input": split["text"],
                "output": [words[label] for label in split["labels"]],
                "movie": split["movie"],
                "sentiment": split["labels"],
            }
        )

    raw = data.load_rotten_tomatoes(test_size=test_size)
    return datasets.DatasetDict(train=cast(raw["train"]), test=cast(raw["test"]))


def tokenize_instructions(
    dataset: datasets.Dataset, tokenizer, max_seq_length: int, keep: tuple = ()
) -> datasets.Dataset:
    """
    `input_ids` (prompt, response, EOS) and `labels` (-100 over the prompt) truncated to `max_seq_length`, plus the
    columns in `keep`. The prompt is cut from its start when needed, so that the response keeps at least half of
    the length; examples left with no response token are dropped (and counted in the log).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no `eos_token`: set one (the response must end with it).")
    bos = (
        [tokenizer.bos_token_id]
        if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
        else []
    )

    def encode(record):
        prompt = tokenizer(format_prompt(record), add_special_tokens=False)["input_ids"]
        response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [eos]
        response = response[: max(max_seq_length - len(bos) - len(prompt), (max_seq_length - len(bos)) // 2)]
        prompt = prompt[max(0, len(bos) + len(prompt) + len(response) - max_seq_length) :]
        ids = bos + prompt + response
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * (len(bos) + len(prompt)) + response}

    drop = [c for c in dataset.column_names if c not in keep]
    out = dataset.map(encode, remove_columns=drop, desc="tokenise")
    kept = out.filter(lambda r: any(t != IGNORE_INDEX for t in r["labels"]))
    if len(kept) < len(out):
        logger.warning("dropped %d examples with no response token after truncation", len(out) - len(kept))
    return kept


class CausalLMCollator:
    """
    Pads `input_ids` (with `pad_token_id`), `attention_mask` and `labels` (with -100) to the longest example,
    on the right or the left (`padding_side`). With `position_ids=True` it also gives every example positions
    0, 1, ... from its first real token, so that left padding does not shift absolute positions (GPT-2).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", position_ids: bool = True):
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
        self.pad_token_id, self.padding_side, self.position_ids = pad_token_id, padding_side, position_ids

    def __call__(self, features: list[dict]) -> dict:
        length = max(len(f["input_ids"]) for f in features)
        ids, masks, labels = [], [], []
        for f in features:
            pad = length - len(f["input_ids"])
            own_labels = list(f["labels"]) if "labels" in f else list(f["input_ids"])

            def side(row, value, pad=pad):
                return [value] * pad + list(row) if self.padding_side == "left" else list(row) + [value] * pad

            ids.append(side(f["input_ids"], self.pad_token_id))
            masks.append(side([1] * len(f["input_ids"]), 0))
            labels.append(side(own_labels, IGNORE_INDEX))
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(masks),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if self.position_ids:
            batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
        return batch


def train_byte_bpe_tokenizer(texts, vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on `texts` (no download), as a `PreTrainedTokenizerFast` with
    `<s>` / `</s>` / `<pad>` special tokens. It decodes exactly what it encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@torch.no_grad()
def generation_exact_match(
    model, tokenizer, records: datasets.Dataset, *, max_seq_length: int, max_new_tokens: int = 8, batch_size: int = 32
) -> float:
    """
    The share of `records` whose greedy continuation of the prompt (`model.generate`, left padding), up to EOS and
    stripped, equals the reference `output` stripped. Prompts are cut from their start, as in training, so that
    prompt and answer fit in `max_seq_length` tokens.
    """
    keep = max(1, max_seq_length - max_new_tokens)
    if len(records) == 0:
        return float("nan")
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    hits = 0
    try:
        for start in range(0, len(records), batch_size):
            rows = records.select(range(start, min(start + batch_size, len(records))))
            prompts = [tokenizer(format_prompt(r), add_special_tokens=False)["input_ids"][-keep:] for r in rows]
            collate = CausalLMCollator(tokenizer.pad_token_id, "left", position_ids=False)
            batch = collate([{"input_ids": p} for p in prompts])
            out = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            hits += sum(t.strip() == r["output"].strip() for t, r in zip(texts, rows))
    finally:
        model.train(was_training)
    return hits / len(records)
