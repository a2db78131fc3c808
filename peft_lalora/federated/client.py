"""A client's local round: load nothing, copy nothing; the server has already put the global adapter into the
one model. Run `local_steps` steps under the schedule, each on a Poisson-sampled batch of the client's shard."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

from ..privacy.sampling import poisson_sample
from .seeding import generator, global_rng

LABEL_KEYS = ("labels", "label", "label_ids")


def model_columns(model: torch.nn.Module) -> set:
    """The dataset columns a model call accepts (its forward signature) plus the labels."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters) | set(LABEL_KEYS)


class ClientShard:
    """One client's examples: rows `indices` of a `datasets.Dataset` (all rows if None), read on demand, so
    partitioning never copies or re-indexes the data; the dataset is restricted to model columns."""

    def __init__(self, dataset, collate: Callable, columns: set, device, indices=None):
        drop = [c for c in dataset.column_names if c not in columns]
        self.dataset = dataset.remove_columns(drop) if drop else dataset
        self.indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
        self.collate = collate
        self.device = device

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, positions: list) -> dict:
        """Collate the shard's examples at `positions` (0-based within the shard) into model inputs."""
        if not positions:  # an empty Poisson batch: the right keys and shapes, zero rows
            one = self.collate([self.dataset[self.indices[0]]])
            return {k: v[:0].to(self.device) for k, v in one.items() if isinstance(v, torch.Tensor)}
        rows = self.dataset[[self.indices[p] for p in positions]]
        features = [dict(zip(rows, values)) for values in zip(*rows.values())]
        out = self.collate(features)
        if "label" in out and "labels" not in out:
            out["labels"] = out.pop("label")
        return {k: v.to(self.device) for k, v in out.items() if isinstance(v, torch.Tensor)}


def run_local_round(*, tuner, stepper, shard: ClientShard, make_optimizer: Callable, round_idx: int, client: int,
                    local_steps: int, batch_size: int, seed: int) -> dict:
    """
    Train the model (already holding the global adapter) on one client's shard for `local_steps` steps.
    Every random draw (batches, noise, dropout) derives from (seed, round, client), where `seed` is the run's
    private root (`seeding.secret_seed`, or a fixed `noise_seed`), never the public seed of a DP run. Returns the
    factors that trained (the tensors to send) and statistics, `dropped` counting examples whose gradient was
    not finite.
    """
    sampler = generator(seed, "sample", round_idx, client)
    noise = generator(seed, "noise", round_idx, client, device=shard.device)
    sample_rate = batch_size / len(shard)
    trained, losses, examples, dropped = set(), [], 0, 0
    with global_rng(seed, "dropout", round_idx, client):  # dropout takes no generator; the caller's RNG is kept
        stepper.reset(make_optimizer(), noise)
        for step in range(local_steps):
            factors = tuner.trainable_factors(round_idx, step)
            tuner.set_trainable_factors(factors)
            trained |= factors
            indices = poisson_sample(len(shard), sample_rate, sampler).tolist()
            if not indices and not stepper.private:
                continue  # nothing to learn from, and no privacy mechanism that must run
            out = stepper(shard.batch(indices), expected_batch_size=batch_size)
            examples += out["batch_size"]
            dropped += out.get("dropped", 0)
            if math.isfinite(out["loss"]):
                losses.append(out["loss"])
    return {"factors": frozenset(trained), "loss": sum(losses) / len(losses) if losses else float("nan"),
            "examples": examples, "dropped": dropped}
