"""The DP noise and the Poisson batches come from secret randomness, kept only in the private
checkpoint; a trainer never replays its rounds; a DP checkpoint without a consistent ledger is refused."""

import json
import os
import shutil

import pytest
import torch
from fed_helpers import adapter_state, make_trainer, toy_args, toy_dataset, toy_model
from transformers import TrainerCallback, default_data_collator

from peft_lalora import CheckpointMismatchError, ConfigError, FederatedDPTrainer, HubError, LALoraWarning
from peft_lalora.federated import ClientShard, LocalConfig, client_update, make_stepper, model_columns
from peft_lalora.federated.checkpoint import STATE_DIR


def secret_run(path, **overrides):
    """A private run with the public settings fixed (seed 0) and the noise left to the OS (noise_seed=None)."""
    return make_trainer(path, noise_seed=None, **{"num_rounds": 2, **overrides})


def test_same_public_arguments_give_different_adapters(tmp_path):
    # Prepare / Execute: two runs with identical public arguments, seed included
    first, second = secret_run(tmp_path / "a"), secret_run(tmp_path / "b")
    first.train()
    second.train()
    # Assert: the noise (and the batches) differ, so the adapters differ; the ledgers are the same
    a, b = adapter_state(first.model), adapter_state(second.model)
    assert any(not torch.equal(a[n], b[n]) for n in a)
    assert first.ledger.state_dict() == second.ledger.state_dict()


def test_fixed_noise_seed_reproduces_and_is_reported_as_not_private(tmp_path):
    with pytest.warns(LALoraWarning, match="NO differential-privacy guarantee"):
        args = toy_args(tmp_path / "a", noise_seed=7)
    first = FederatedDPTrainer(model=toy_model(), args=args, train_dataset=toy_dataset())
    second = make_trainer(tmp_path / "b", noise_seed=7)
    first.train()
    second.train()
    a, b = adapter_state(first.model), adapter_state(second.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    report = first.privacy_report()
    assert report["secret_randomness"] is False and "NO differential-privacy guarantee" in report["noise_seed_warning"]
    assert secret_run(tmp_path / "c").privacy_report()["secret_randomness"] is True


class SnapshotAfterRound(TrainerCallback):
    """Copies the private checkpoint as it was after round `round_number` (a kill at that boundary)."""

    def __init__(self, source, target, round_number):
        self.source, self.target, self.round_number = source, target, round_number

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.round_number:
            shutil.copytree(self.source, self.target)


def test_resume_from_the_private_checkpoint_equals_the_uninterrupted_run(tmp_path):
    # Prepare: an uninterrupted secret-noise run whose checkpoint after round 1 is kept aside
    snapshot = tmp_path / "snapshot" / STATE_DIR
    args = toy_args(tmp_path / "full", noise_seed=None, num_rounds=3)
    full = FederatedDPTrainer(
        model=toy_model(),
        args=args,
        train_dataset=toy_dataset(),
        callbacks=[SnapshotAfterRound(tmp_path / "full" / STATE_DIR, snapshot, 1)],
    )
    full.train()
    # Execute: a fresh trainer resumes from the snapshot (a run killed after round 1)
    resumed = FederatedDPTrainer(
        model=toy_model(),
        args=toy_args(tmp_path / "snapshot", noise_seed=None, num_rounds=3),
        train_dataset=toy_dataset(),
    )
    resumed.train(resume_from_checkpoint=True)
    # Assert: bit-identical adapter and ledger, although the noise was secret
    a, b = adapter_state(full.model), adapter_state(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.ledger.state_dict() == full.ledger.state_dict()


def test_nothing_published_holds_the_secret(tmp_path):
    trainer = secret_run(tmp_path / "run")
    trainer.train()
    trainer.save_model()
    secret = json.loads((tmp_path / "run" / STATE_DIR / "state.json").read_text())["private_seed"]
    assert isinstance(secret, str) and len(secret) == 64  # 256 bits from the OS, in the private checkpoint only
    published = [
        os.path.join(root, f) for root, _, files in os.walk(tmp_path / "run") for f in files if STATE_DIR not in root
    ]
    assert {"adapter_model.safetensors", "privacy_report.json", "training_args.json", "README.md"} <= {
        os.path.basename(p) for p in published
    }
    for path in published:
        assert secret.encode() not in open(path, "rb").read(), path
    assert json.loads((tmp_path / "run" / "training_args.json").read_text())["noise_seed"] is None


def test_push_to_hub_refuses_a_fixed_noise_seed(tmp_path):
    trainer = make_trainer(tmp_path / "run", num_rounds=1, hub_model_id="alice/not-private")
    trainer.train()
    with pytest.raises(HubError, match="allow_fixed_noise_seed"):  # before any network call (none is reachable)
        trainer.push_to_hub()


def test_second_train_call_is_refused_and_charges_nothing(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    before = trainer.ledger.state_dict()
    with pytest.raises(ConfigError, match="already called"):
        trainer.train()
    assert trainer.ledger.state_dict() == before


def _killed_run(path):
    trainer = FederatedDPTrainer(model=toy_model(), args=toy_args(path, num_rounds=3), train_dataset=toy_dataset())

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    trainer.add_callback(Kill())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    return path / STATE_DIR / "state.json"


@pytest.mark.parametrize("tamper", ["removed", "emptied", "one_client_zeroed", "sigma_changed"])
def test_checkpoint_without_a_consistent_ledger_is_refused(tmp_path, tamper):
    # Prepare: a DP run killed after 2 rounds, then its ledger tampered with
    state_path = _killed_run(tmp_path)
    state = json.loads(state_path.read_text())
    if tamper == "removed":
        del state["ledger"]
    elif tamper == "emptied":
        state["ledger"] = {}
    elif tamper == "one_client_zeroed":
        charged = next(k for k, h in state["ledger"]["histories"].items() if h)
        state["ledger"]["histories"][charged] = []
    else:
        state["ledger"]["noise_multiplier"] = 5.0
    state_path.write_text(json.dumps(state))
    # Execute / Assert: resuming is refused; it never reports epsilon 0 for a trained model
    resumed = FederatedDPTrainer(model=toy_model(), args=toy_args(tmp_path, num_rounds=3), train_dataset=toy_dataset())
    with pytest.raises(CheckpointMismatchError, match="ledger"):
        resumed.train(resume_from_checkpoint=True)


def test_checkpoint_without_private_randomness_is_refused(tmp_path):
    state_path = _killed_run(tmp_path)
    state = json.loads(state_path.read_text())
    del state["private_seed"]
    state_path.write_text(json.dumps(state))
    resumed = FederatedDPTrainer(model=toy_model(), args=toy_args(tmp_path, num_rounds=3), train_dataset=toy_dataset())
    with pytest.raises(CheckpointMismatchError, match="private_seed"):
        resumed.train(resume_from_checkpoint=True)


def test_the_private_checkpoint_is_readable_by_its_owner_only(tmp_path):
    trainer = secret_run(tmp_path / "run", num_rounds=1)
    trainer.train()
    assert (tmp_path / "run" / STATE_DIR / "state.json").stat().st_mode & 0o777 == 0o600


def test_a_client_update_neither_reads_nor_moves_the_callers_global_rng():
    # Prepare: one client's shard and a model in train mode (its dropout draws from torch's global generator)
    model = toy_model().train()
    global_state = adapter_state(model)
    shard = ClientShard(toy_dataset(n=40), default_data_collator, model_columns(model), "cpu")
    stepper = make_stepper(model, dp=True, noise_multiplier=1.0)

    def update(caller_seed):
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        delta = client_update(
            model=model,
            stepper=stepper,
            shard=shard,
            global_state=global_state,
            round_idx=0,
            client=0,
            lr=0.5,
            local=LocalConfig(local_steps=2, batch_size=8),
            private_seed=0,
        ).delta
        return delta, before, torch.get_rng_state()

    # Execute: the same update, called with two different global generator states
    first, before_first, after_first = update(caller_seed=1)
    second, before_second, after_second = update(caller_seed=2)
    # Assert: the caller's generator is where it was, and the update depends on (seed, round, client) only
    assert torch.equal(after_first, before_first) and torch.equal(after_second, before_second)
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)
