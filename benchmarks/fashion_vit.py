"""Pretrain a tiny ViT on Fashion-MNIST (offline): the "pretrained model" of the vision track of
`privacy_utility.py`, which then fine-tunes it with federated DP LoRA on MNIST digits (issue 6).

No pretrained ViT is installable offline, so this makes one: a 4-layer, hidden-64 ViT on 28x28 grey images
(7x7 patches of 4x4 pixels), trained non-privately with AdamW on the 60,000 public Fashion-MNIST images. The
result is saved with `save_pretrained` (safetensors) plus `pretraining.json` (settings, test accuracy, time)
in a cache folder keyed by the settings, and reused when present. Deterministic for a given torch build and
thread count (`torch.use_deterministic_algorithms` is not needed on the CPU).

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/fashion_vit.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))

import mnist_data  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

logger = logging.getLogger("fashion_vit")
CONFIG = dict(
    image_size=28,
    patch_size=4,
    num_channels=1,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    num_labels=10,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
TRAINING = dict(epochs=3, batch_size=128, learning_rate=2e-3, weight_decay=0.05, warmup_steps=100, seed=0)
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "peft_lalora", "fashion_vit")


def settings_key(config: dict, training: dict) -> str:
    blob = json.dumps({"config": config, "training": training, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _arrays(directory: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = mnist_data.fashion_mnist_arrays(split, directory)
    return torch.from_numpy(images), torch.from_numpy(labels)


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(
        int((model(pixel_values=images[i : i + batch_size]).logits.argmax(-1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(labels), batch_size)
    )
    return correct / len(labels)


def pretrain(
    out_dir: str, directory: str = mnist_data.FASHION_MNIST_DIR, config: dict = CONFIG, training: dict = TRAINING
) -> dict:
    """Train the tiny ViT on Fashion-MNIST's training set and save it (and its record) in `out_dir`."""
    x_train, y_train = _arrays(directory, "train")
    x_test, y_test = _arrays(directory, "test")
    torch.manual_seed(training["seed"])
    model = ViTForImageClassification(ViTConfig(**config))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=training["learning_rate"], weight_decay=training["weight_decay"]
    )
    steps_per_epoch = len(y_train) // training["batch_size"]
    total = training["epochs"] * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / training["warmup_steps"]) * max(0.0, 1.0 - s / total)
    )  # linear warm-up, linear decay
    generator, start, step = torch.Generator().manual_seed(training["seed"]), time.time(), 0
    for epoch in range(training["epochs"]):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * training["batch_size"] : (i + 1) * training["batch_size"]]
            loss = model(pixel_values=x_train[idx], labels=y_train[idx]).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 100 == 0:
                logger.info(
                    "epoch %d step %d/%d loss %.3f (%.0f s)", epoch, step, total, loss.item(), time.time() - start
                )
    record = {
        "config": config,
        "training": training,
        "steps": step,
        "train_seconds": round(time.time() - start, 1),
        "fashion_mnist_test_accuracy": accuracy(model, x_test, y_test),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    os.makedirs(out_dir, exist_ok=True)
    tmp = out_dir + ".tmp"
    model.save_pretrained(tmp)  # safetensors
    with open(os.path.join(tmp, "pretraining.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    for name in os.listdir(tmp):  # the record lands last: a folder with pretraining.json is complete
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)
    return record


def pretrained_fashion_vit(
    cache_dir: str = DEFAULT_CACHE, directory: str = mnist_data.FASHION_MNIST_DIR
) -> tuple[str, dict]:
    """(folder, record) of the pretrained tiny ViT: from the cache, or pretrained now (a few minutes)."""
    folder = os.path.join(cache_dir, settings_key(CONFIG, TRAINING))
    record_path = os.path.join(folder, "pretraining.json")
    if not os.path.exists(record_path):
        logger.warning("pretraining the tiny ViT on Fashion-MNIST into %s (a few minutes, once)", folder)
        pretrain(folder, directory)
    with open(record_path) as handle:
        return folder, json.load(handle)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--fashion-dir", default=mnist_data.FASHION_MNIST_DIR)
    p.add_argument("--threads", type=int, default=1)
    opts = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(opts.threads)
    folder, record = pretrained_fashion_vit(opts.cache_dir, opts.fashion_dir)
    print(json.dumps({"folder": folder, **record}, indent=1))
    return record


if __name__ == "__main__":
    main()
