"""`aggregation="trimmed_mean"`, the rule added as one file (`federated/rules/trimmed_mean.py`): the coordinate-wise
trimmed mean against a NumPy reference, robust to an outlying client, and the same adapter from both engines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fed_helpers import toy_args, toy_model
from safetensors.torch import load_file
from test_flower_inprocess import run_config, run_flower, shards  # noqa: F401  (shards: the clients' data)

import peft_lalora  # noqa: F401
from peft_lalora import ConfigError, FederatedDPTrainer
from peft_lalora.federated.rules import make_rule

ARGS = type("Args", (), {"aggregation_trim": 0.25})()


def reference(values: list, trim: float) -> np.ndarray:
    """Per coordinate: sort, drop floor(trim * n) from each end, average the rest (NumPy, float64)."""
    stacked = np.sort(np.stack(values).astype(np.float64), axis=0)
    k = int(np.floor(trim * len(values)))
    return stacked[k : len(values) - k].mean(axis=0)


def test_trimmed_mean_matches_a_numpy_reference_and_ignores_one_outlier():
    # Prepare: 5 clients, one of them sending a delta 1000 times larger
    g = torch.Generator().manual_seed(0)
    global_state = {"w.lora_A.default.weight": torch.zeros(3, 4), "head.weight": torch.ones(2)}
    deltas = [{n: torch.randn(t.shape, generator=g) for n, t in global_state.items()} for _ in range(5)]
    deltas[2] = {n: 1000 * v for n, v in deltas[2].items()}
    rule = make_rule("trimmed_mean", global_state, ARGS)

    # Execute
    for delta in deltas:
        rule.add(delta)
    merged = rule.merged()

    # Assert: the reference to float32 precision, and within the honest clients' range despite the outlier
    for name, start in global_state.items():
        expected = start.numpy() + reference([d[name].numpy() for d in deltas], 0.25)
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=0, atol=1e-6)
        honest = torch.stack([d[name] for k, d in enumerate(deltas) if k != 2])
        assert bool(((merged[name] - start) <= honest.max(0).values + 1e-6).all())


def test_trimmed_mean_refuses_example_weights():
    with pytest.raises(ConfigError, match="`aggregation_weights='uniform'`"):
        toy_args("unused", aggregation="trimmed_mean", aggregation_weights="num_samples")
    with pytest.raises(ConfigError, match="`aggregation` must be one of"):
        toy_args("unused", aggregation="median_of_means")


def test_both_engines_release_the_same_trimmed_mean(tmp_path, shards):  # noqa: F811
    # Prepare: every client in every round, so that one value per coordinate is trimmed at each end
    root, datasets = shards
    rule = {"aggregation": "trimmed_mean", "aggregation_trim": 0.25, "clients_per_round": 4, "num_rounds": 1}

    def trainer(folder, **overrides):
        run = FederatedDPTrainer(
            model=toy_model(), args=toy_args(tmp_path / folder, **overrides), client_datasets=datasets
        )
        run.train()
        run.save_model()
        return load_file(str(tmp_path / folder / "adapter_model.safetensors"))

    # Execute
    trimmed = trainer("trimmed", **rule)
    mean = trainer("mean", **{**rule, "aggregation": "mean"})
    run_flower(tmp_path, root, run_config(tmp_path, **rule))

    # Assert: the Flower adapter is the trainer's to 1e-6, and the rule changed the adapter
    flower = load_file(str(tmp_path / "flower" / "adapter_model.safetensors"))
    for name in trimmed:
        torch.testing.assert_close(flower[name], trimmed[name], atol=1e-6, rtol=0)
    assert any(not torch.allclose(trimmed[n], mean[n], atol=1e-6) for n in trimmed)
