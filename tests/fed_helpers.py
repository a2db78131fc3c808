"""Small federated setups for the trainer tests: a tiny RoBERTa, a synthetic learnable task, fast arguments."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from datasets import Dataset
from peft import get_peft_model
from tiny_models import tiny_roberta

import peft_lalora  # noqa: F401
from peft_lalora import FederatedDPArguments, FederatedDPTrainer, LALoraConfig


def toy_dataset(n: int = 240, length: int = 8, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, length), generator=g)
    labels = (ids[:, 0] > 50).long()
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n, "labels": labels.tolist()}
    )


def toy_shards(sizes, folder=None) -> list:
    """Consecutive shards of `toy_dataset()` of the given sizes; with `folder`, each is also saved to `folder/<k>`."""
    data, start, shards = toy_dataset(), 0, []
    for k, n in enumerate(sizes):
        shards.append(data.select(range(start, start + n)))
        if folder is not None:
            shards[-1].save_to_disk(str(folder) + f"/{k}")
        start += n
    return shards


def toy_model(method: str = "lalora", seed: int = 0, device: str = "cpu", **config):
    """The tiny RoBERTa with the method's adapter; the base is put on `device` first, so the adapter lands there too."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS", **config}
    return get_peft_model(tiny_roberta(seed).to(device), LALoraConfig.for_method(method, **config))


def toy_args(output_dir, **overrides) -> FederatedDPArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        num_clients=4,
        clients_per_round=2,
        num_rounds=2,
        local_steps=2,
        per_device_train_batch_size=8,
        learning_rate=0.5,
        noise_multiplier=1.0,
        per_sample_max_grad_norm=1.0,
        seed=0,
        report_to=[],
        disable_tqdm=True,
        eval_rounds=0,
        noise_seed=0,
    )  # tests compare runs: the noise is fixed (no guarantee; see test_secret_randomness)
    kwargs.update(overrides)
    if not kwargs.get("dp", True):
        kwargs.pop("noise_multiplier", None)
        kwargs.pop("noise_seed", None)
    if "target_epsilon" in overrides:
        kwargs.pop("noise_multiplier", None)
    return FederatedDPArguments(**kwargs)


def flower_run_config(method: str = "lalora") -> dict:
    """The Flower twin of `toy_args`: the run config a server sends (same federation, privacy and noise seed)."""
    return {
        "method": method,
        "num-clients": 4,
        "clients-per-round": 2,
        "num-rounds": 2,
        "local-steps": 2,
        "batch-size": 8,
        "learning-rate": 0.5,
        "noise-multiplier": 1.0,
        "per-sample-max-grad-norm": 1.0,
        "seed": 0,
        "noise-seed": 0,
    }


def accuracy(pred) -> dict:
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


def make_trainer(tmp_path, method="lalora", dataset=None, model=None, **overrides) -> FederatedDPTrainer:
    return FederatedDPTrainer(
        model=model or toy_model(method),
        args=toy_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else toy_dataset(),
    )


def adapter_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n}


def sha256_file(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()
