"""User-level DP inside a client (`privacy_unit="user"`, issue 23): users, not rows, are Poisson sampled and
accounted; each sampled user gives one example, clipped as any example is. The attacks: neighbouring datasets that
differ by every example of one user (1 vs 1,000 examples), the inclusion frequency of users, the accountant against
opacus at the user-level rate, resume and an edited user id."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from fed_helpers import toy_args, toy_dataset, toy_model
from opacus.accountants import RDPAccountant
from test_trainer_resume import KillAfterRound
from transformers import default_data_collator

from peft_lalora import CheckpointMismatchError, ConfigError, FederatedDPTrainer
from peft_lalora.federated import LocalConfig, client_update
from peft_lalora.federated.client import ClientShard, model_columns
from peft_lalora.federated.client_update import make_stepper
from peft_lalora.privacy.secure_random import SecureRandom
from peft_lalora.tuner import METHODS

HEAVY = 1000  # examples of the heavy user


def users_dataset(light: int, heavy: int, seed: int = 0) -> Dataset:
    """`light` users with one example each (ids 'u0', 'u1', ...), then user 'heavy' with `heavy` examples (none
    when 0), all from the toy task; the heavy user's examples come last, so that the others keep their order."""
    data = toy_dataset(light + max(heavy, 1), seed=seed).select(range(light + heavy))
    return data.add_column("user", [f"u{i}" for i in range(light)] + ["heavy"] * heavy)


def shard_of(dataset, model) -> ClientShard:
    return ClientShard(dataset, default_data_collator, model_columns(model), "cpu", user_column="user")


def released_update(dataset, seed, *, lr=0.5, clip=1.0, batch=4, method="dplora", num_units=None) -> torch.Tensor:
    """One client's update of one local step without noise (sigma 0), flattened; `num_units` fixes the number of
    users the rate q = batch / users is computed from (the mechanism's public q, held fixed between neighbours)."""
    model = toy_model(method)
    stepper = make_stepper(model, dp=True, noise_multiplier=0.0, per_sample_max_grad_norm=clip)
    shard = shard_of(dataset, model)
    if num_units is not None:
        shard.__class__ = type("FixedRate", (ClientShard,), {"num_units": num_units})
    state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n}
    update = client_update(
        model=model,
        stepper=stepper,
        shard=shard,
        global_state=state,
        round_idx=0,
        client=0,
        lr=lr,
        local=LocalConfig(local_steps=1, batch_size=batch),
        private_seed=seed,
    )
    return torch.cat([update.delta[n].flatten() for n in sorted(update.delta)])


def heavy_sampled_seed(light: int, batch: int) -> int:
    """A fixed noise seed under which round 0, client 0, step 0 samples the heavy user (the last of light + 1)."""
    for seed in range(100):
        included = SecureRandom(seed, "sample", 0, 0).bernoulli(light + 1, batch / (light + 1))
        if included[-1]:
            return seed
    raise AssertionError("no seed samples the heavy user")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_removing_every_example_of_a_user_moves_the_update_by_at_most_the_bound(method):
    # Prepare: 7 one-example users and a user with 1,000 examples; the neighbour lacks the heavy user entirely.
    light, batch, lr, clip = 7, 4, 0.5, 1.0
    seed = heavy_sampled_seed(light, batch)
    # Execute: the same streams and the same public rate q = B / 8 on both datasets, no noise
    with_user = released_update(users_dataset(light, HEAVY), seed, lr=lr, clip=clip, batch=batch, method=method)
    without = released_update(
        users_dataset(light, 0), seed, lr=lr, clip=clip, batch=batch, method=method, num_units=light + 1
    )
    # Assert: one SGD step on the sum of clipped per-user gradients over the expected batch B: removing one user
    # removes one clipped row, so the update moves by <= lr * C / B (the low-pass filter of LA-LoRA is an average,
    # which does not lengthen it); and it does move (the heavy user was sampled).
    moved = (with_user - without).norm().item()
    assert 0 < moved <= lr * clip / batch * (1 + 1e-5)


def test_a_user_with_1000_examples_weighs_no_more_than_a_user_with_one():
    # Prepare
    light, batch, lr, clip = 7, 4, 0.5, 1.0
    seed = heavy_sampled_seed(light, batch)
    without = released_update(users_dataset(light, 0), seed, lr=lr, batch=batch, num_units=light + 1)
    # Execute: the contribution of the last user, holding 1,000 examples or one
    weights = {
        m: (released_update(users_dataset(light, m), seed, lr=lr, batch=batch) - without).norm().item()
        for m in (1, HEAVY)
    }
    # Assert: each is one clipped row (both at the bound here: the toy task's gradients exceed C)
    assert weights[HEAVY] <= lr * clip / batch * (1 + 1e-5)
    assert weights[HEAVY] <= weights[1] * (1 + 1e-4)


def test_users_not_rows_are_sampled_at_the_user_rate():
    # Prepare: 10 users of 1, 10 and 1,000 examples (the user id column is all the shard needs)
    sizes = [1, 10, 1000, 1, 10, 1000, 3, 1, 1, 50]
    ids = [f"user{k}" for k, m in enumerate(sizes) for _ in range(m)]
    dataset = toy_dataset(len(ids)).add_column("user", ids)
    shard = shard_of(dataset, toy_model("dplora"))
    batch, draws = 3, 4000
    q = batch / len(sizes)  # computed here from the users, not from the 2,077 rows
    sampler, picker = SecureRandom(5, "sample"), SecureRandom(5, "pick")
    counts = torch.zeros(len(sizes))
    # Execute
    for _ in range(draws):
        chosen = [ids[p] for p in shard.sample(batch, sampler, picker)]
        assert len(chosen) == len(set(chosen))  # one example per sampled user, however many they hold
        for user in chosen:
            counts[int(user[4:])] += 1
    # Assert: every user's inclusion frequency is q (within 5 binomial standard errors), whatever its size
    freq = counts / draws
    assert torch.all((freq - q).abs() < 5 * (q * (1 - q) / draws) ** 0.5), freq


def two_client_users(rows_per_client=(60, 90), users_per_client=(12, 20)) -> list:
    """Two client datasets with a `user` column: client k's rows dealt round-robin to its users."""
    out, start = [], 0
    data = toy_dataset(sum(rows_per_client))
    for k, (n, u) in enumerate(zip(rows_per_client, users_per_client)):
        part = data.select(range(start, start + n))
        out.append(part.add_column("user", [f"c{k}-u{i % u}" for i in range(n)]))
        start += n
    return out


def user_trainer(path, clients=None, train_dataset=None, **overrides) -> FederatedDPTrainer:
    settings = dict(num_clients=2, clients_per_round=2, privacy_unit="user", user_column="user", num_rounds=2)
    args = toy_args(path, **{**settings, **overrides})
    if train_dataset is not None:  # partitioned by the trainer (IID)
        return FederatedDPTrainer(model=toy_model(), args=args, train_dataset=train_dataset)
    return FederatedDPTrainer(model=toy_model(), args=args, client_datasets=clients or two_client_users())


def pooled_users(edit: bool = False) -> Dataset:
    """120 rows of 24 users (row i: user i % 24), for the trainer's own partition; `edit` moves row 5 to user 0."""
    ids = [f"u{i % 24}" for i in range(120)]
    if edit:
        ids[5] = "u0"
    return toy_dataset(120).add_column("user", ids)


def test_epsilon_is_opacus_rdp_at_the_user_rate(tmp_path):
    # Prepare: sigma calibrated for epsilon 3; q_user and the steps computed here from the data and the settings
    clients = two_client_users()
    trainer = user_trainer(tmp_path, clients, target_epsilon=3.0)
    users = [len(set(c["user"])) for c in clients]
    batch, steps = 8, 2 * 2  # every client takes part in every round: num_rounds x local_steps
    delta = min(1e-5, 1 / min(users))
    # Execute
    trainer.train()
    report = trainer.privacy_report()
    # Assert: each client's epsilon is opacus' RDP of (sigma, B / users, steps) at the default delta
    sigma = report["noise_multiplier"]
    for k, entry in enumerate(report["clients"]):
        accountant = RDPAccountant()
        accountant.history = [(sigma, batch / users[k], steps)]
        assert entry["sample_rate"] == batch / users[k] and entry["users"] == users[k]
        assert entry["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    assert report["delta"] == delta and report["epsilon"] <= 3.0
    assert report["privacy_unit"] == "user" and report["user_column"] == "user"
    assert report["unit"] == "all the examples of one user of one client"


def test_report_and_card_name_the_unit(tmp_path):
    trainer = user_trainer(tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    with open(tmp_path / "out" / "privacy_report.json") as handle:
        report = json.load(handle)
    card = open(tmp_path / "out" / "README.md").read()
    assert report["privacy_unit"] == "user" and [c["users"] for c in report["clients"]] == [12, 20]
    assert "all the examples of one user of one client" in card and "column `user`" in card


def test_resume_is_bit_identical_and_an_edited_user_id_is_refused(tmp_path):
    # Prepare: the uninterrupted run, and a run killed after round 1 (its checkpoint)
    full = user_trainer(tmp_path / "full", train_dataset=pooled_users())
    full.train()
    killed = user_trainer(tmp_path / "stopped", train_dataset=pooled_users())
    killed.add_callback(KillAfterRound(1))
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    # Execute: resume on the same data
    resumed = user_trainer(tmp_path / "stopped", train_dataset=pooled_users())
    resumed.train(resume_from_checkpoint=True)
    # Assert: bit-identical; then one example moved to another user (every tensor the model sees, and the
    # partition, unchanged): the keyed fingerprint of the users refuses the resume
    for name, tensor in full.global_adapter.state.items():
        assert torch.equal(tensor, resumed.global_adapter.state[name]), name
    assert resumed.ledger.state_dict() == full.ledger.state_dict()
    edited = user_trainer(tmp_path / "stopped", train_dataset=pooled_users(edit=True))
    with pytest.raises(CheckpointMismatchError, match="differ from those the checkpoint"):
        edited.train(resume_from_checkpoint=True)


def test_resume_as_example_level_is_refused(tmp_path):
    killed = user_trainer(tmp_path)
    killed.add_callback(KillAfterRound(1))
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    args = toy_args(tmp_path, num_clients=2, clients_per_round=2)
    clients = [c.remove_columns("user") for c in two_client_users()]
    with pytest.raises(CheckpointMismatchError, match="privacy_unit"):
        FederatedDPTrainer(model=toy_model(), args=args, client_datasets=clients).train(resume_from_checkpoint=True)


@pytest.mark.parametrize(
    "overrides,named",
    [
        ({"privacy_unit": "person"}, "`privacy_unit`"),
        ({"privacy_unit": "user"}, "`user_column`"),
        ({"user_column": "user"}, "`user_column`='user' is read only with `privacy_unit`='user'"),
    ],
)
def test_bad_unit_settings_are_refused(tmp_path, overrides, named):
    with pytest.raises(ConfigError) as info:
        toy_args(tmp_path, **overrides)
    assert named in str(info.value)


def test_missing_column_and_null_ids_are_refused(tmp_path):
    clients = two_client_users()
    no_column = [clients[0].remove_columns("user"), clients[1]]
    with pytest.raises(ConfigError, match="`user_column`='user' is not a column"):
        user_trainer(tmp_path / "a", no_column).train()
    ids = list(clients[1]["user"])
    ids[3] = None
    nulls = [clients[0], clients[1].remove_columns("user").add_column("user", ids)]
    with pytest.raises(ConfigError, match="has no user id"):
        user_trainer(tmp_path / "b", nulls).train()


def test_a_client_with_fewer_users_than_the_batch_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="number of users"):
        user_trainer(tmp_path, two_client_users(users_per_client=(5, 20))).train()


def test_example_level_runs_are_unchanged_by_a_user_column(tmp_path):
    """The default unit ignores users: the same adapter with or without a user column in the data."""
    plain = [c.remove_columns("user") for c in two_client_users()]
    results = []
    for k, clients in enumerate((plain, two_client_users())):
        args = toy_args(tmp_path / str(k), num_clients=2, clients_per_round=2)
        trainer = FederatedDPTrainer(model=toy_model(), args=args, client_datasets=clients)
        trainer.train()
        results.append(trainer.global_adapter.state)
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    assert os.path.isdir(tmp_path / "0")


def test_earlier_example_level_spending_does_not_compose_into_a_user_level_run(tmp_path):
    # Prepare: an example-level run on the same clients, saved with its privacy report
    clients = two_client_users()
    args = toy_args(tmp_path / "earlier", num_clients=2, clients_per_round=2, num_rounds=1)
    earlier = FederatedDPTrainer(model=toy_model(), args=args, client_datasets=clients)
    earlier.train()
    earlier.save_model(str(tmp_path / "earlier_out"))
    # Execute / Assert: composing it into a user-level epsilon is refused (the units differ)
    later = user_trainer(
        tmp_path / "later",
        clients,
        prior_privacy_report=str(tmp_path / "earlier_out"),
        prior_privacy_same_data=True,
    )
    with pytest.raises(ConfigError, match="epsilons of two units do not compose"):
        later.train()


def test_run_config_keys_and_an_empty_column():
    from peft_lalora.owner.run_config import federated_args

    config = {"num-clients": 2, "clients-per-round": 2, "noise-multiplier": 1.0}
    args = federated_args({**config, "privacy-unit": "user", "user-column": "patient"})
    assert (args.privacy_unit, args.user_column) == ("user", "patient")
    assert federated_args({**config, "privacy-unit": "example", "user-column": ""}).user_column is None  # TOML
    with pytest.raises(ConfigError, match="run-config key `privacy-unit` = 'person'"):
        federated_args({**config, "privacy-unit": "person"})


def test_user_level_composes_with_client_level_dp_in_the_report(tmp_path):
    trainer = user_trainer(tmp_path, client_dp=True, client_noise_multiplier=1.0, client_clip_norm=0.5)
    trainer.train()
    report = trainer.privacy_report()
    assert report["privacy_unit"] == "user" and [c["users"] for c in report["clients"]] == [12, 20]
    assert report["guarantees"][0].startswith("sample-level (all the examples of one user of one client)")
    assert report["client_level"]["epsilon"] > 0
