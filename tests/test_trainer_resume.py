"""Checkpoints and failures of federated training: resume after a kill, changed settings,
atomic checkpoints, client dropout."""

import os

import pytest
import torch
from datasets import Dataset
from fed_helpers import adapter_state, sha256_file, toy_args, toy_dataset, toy_model
from transformers import TrainerCallback

from peft_lalora import AdapterLoadError, CheckpointMismatchError, FederatedDPTrainer
from peft_lalora.federated import LocalConfig, client_update
from peft_lalora.federated import checkpoint as checkpoint_module
from peft_lalora.federated.checkpoint import STATE_DIR


class KillAfterRound(TrainerCallback):
    def __init__(self, round_number):
        self.round_number = round_number

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.round_number:
            raise KeyboardInterrupt(f"killed after round {self.round_number}")


def trainer_for(path, callbacks=None, **overrides):
    args = toy_args(path, **{"num_rounds": 3, **overrides})
    return FederatedDPTrainer(model=toy_model(), args=args, train_dataset=toy_dataset(), callbacks=callbacks)


def final_adapter_sha(trainer, path):
    trainer.save_model(str(path))
    return sha256_file(os.path.join(path, "adapter_model.safetensors"))


@pytest.mark.parametrize("kill_after", [1, 2])
def test_resume_after_kill_is_bit_identical(tmp_path, kill_after):
    # Prepare: the uninterrupted run
    full = trainer_for(tmp_path / "full")
    full.train()
    full_sha = final_adapter_sha(full, tmp_path / "full_out")
    # Execute: killed at a round boundary, then resumed by a fresh trainer (a fresh process would do the same)
    killed = trainer_for(tmp_path / "killed", callbacks=[KillAfterRound(kill_after)])
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed = trainer_for(tmp_path / "killed")
    resumed.train(resume_from_checkpoint=True)
    # Assert
    assert final_adapter_sha(resumed, tmp_path / "resumed_out") == full_sha
    assert resumed.ledger.state_dict() == full.ledger.state_dict()
    rounds = [log["round"] for log in resumed.state.log_history if "round" in log]
    assert rounds == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "field,value",
    [
        ("per_sample_max_grad_norm", 0.5),
        ("noise_multiplier", 1.5),
        ("per_device_train_batch_size", 6),
        ("num_clients", 5),
        ("seed", 1),
        ("accountant", "prv"),
        ("weight_decay", 0.01),  # not a privacy setting, but it changes the result
    ],
)
def test_resume_with_changed_privacy_setting_names_the_field(tmp_path, field, value):
    first = trainer_for(tmp_path, callbacks=[KillAfterRound(1)])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    changed = trainer_for(tmp_path, **{field: value})
    with pytest.raises(CheckpointMismatchError, match=f"`(args\\.)?{field}`"):
        changed.train(resume_from_checkpoint=True)


@pytest.mark.parametrize(
    "config_change,error,match",
    [
        ({"r": 2}, AdapterLoadError, r"wrong shape .*lora_A\.default\.weight: expected \(2, 16\), found \(4, 16\)"),
        (
            {"lora_alpha": 4},
            CheckpointMismatchError,
            "`adapter.lora_alpha` differs from the checkpoint: saved 8, current 4",
        ),
        ({"target_modules": ["query"]}, AdapterLoadError, r"unexpected .*value\.lora_A\.default\.weight"),
    ],
)  # r and target_modules change the tensors, which are checked first; lora_alpha only the settings
def test_resume_with_changed_adapter_is_refused(tmp_path, config_change, error, match):
    first = trainer_for(tmp_path, callbacks=[KillAfterRound(1)])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    args = toy_args(tmp_path, num_rounds=3)
    changed = FederatedDPTrainer(model=toy_model(**config_change), args=args, train_dataset=toy_dataset())
    with pytest.raises(error, match=match):
        changed.train(resume_from_checkpoint=True)


def test_changed_schedule_is_refused(tmp_path):
    first = trainer_for(tmp_path, callbacks=[KillAfterRound(1)])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    args = toy_args(tmp_path, num_rounds=3)
    changed = FederatedDPTrainer(model=toy_model("rolora"), args=args, train_dataset=toy_dataset())
    with pytest.raises(CheckpointMismatchError, match="alternation"):
        changed.train(resume_from_checkpoint=True)


def test_save_strategy_no_writes_no_round_checkpoints(tmp_path):
    trainer_for(tmp_path, num_rounds=1, save_strategy="no").train()
    assert not (tmp_path / STATE_DIR).exists()


def test_kill_during_checkpoint_save_leaves_previous_loadable(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, num_rounds=2)
    trainer.train()  # checkpoint after round index 1
    directory = tmp_path / STATE_DIR
    before = {name: (directory / name).read_bytes() for name in os.listdir(directory)}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpoint_module, "save_json", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer._save_round(5)  # private: no public call saves one round's checkpoint
    monkeypatch.undo()
    state, tensors = checkpoint_module.load_checkpoint(
        str(directory), expected_shapes={n: tuple(t.shape) for n, t in trainer.global_adapter.state.items()}
    )
    assert state["round"] == 1
    assert (directory / "state.json").read_bytes() == before["state.json"]
    for name, value in tensors.items():
        assert torch.equal(value, trainer.global_adapter.state[name].cpu())


def broken_clients(num_broken):
    """Four client datasets; the first `num_broken` hold a token id outside the vocabulary, so they raise."""
    clients = []
    full = toy_dataset(240)
    for k in range(4):
        part = full.select(range(k * 60, (k + 1) * 60)).to_dict()
        if k < num_broken:
            part["input_ids"] = [[10_000] + ids[1:] for ids in part["input_ids"]]
        clients.append(Dataset.from_dict(part))
    return clients


def test_failed_client_is_dropped_and_survivors_are_averaged(tmp_path):
    args = toy_args(tmp_path, num_rounds=1, clients_per_round=4, min_clients_per_round=2)
    model = toy_model("dplora")
    trainer = FederatedDPTrainer(model=model, args=args, client_datasets=broken_clients(1))
    start = adapter_state(model)
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "round" in entry)
    assert log["failed_clients"] == 1.0 and log["clients"] == 3.0 and "round_aborted" not in log
    # the survivors' mean, recomputed one by one (clients 1, 2, 3)
    locals_ = []
    for client in (1, 2, 3):
        client_update(
            model=model,
            stepper=trainer.stepper,
            global_state=start,
            round_idx=0,
            client=client,
            lr=0.5,
            local=LocalConfig.from_args(trainer.args),
            private_seed=0,
            shard=trainer.federation.shards[client],
        )
        locals_.append(adapter_state(model))
    trainer.global_adapter.load_into_model()
    after = adapter_state(model)
    for name in start:
        expected = start[name] + sum(loc[name] - start[name] for loc in locals_) / 3
        torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6)


def test_too_few_survivors_abort_the_round_and_release_nothing(tmp_path):
    args = toy_args(tmp_path, num_rounds=1, clients_per_round=4, min_clients_per_round=3)
    model = toy_model()
    trainer = FederatedDPTrainer(model=model, args=args, client_datasets=broken_clients(2))
    start = adapter_state(model)
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "round" in entry)
    assert log["round_aborted"] == 1.0 and log["failed_clients"] == 2.0
    after = adapter_state(model)
    assert all(torch.equal(start[n], after[n]) for n in start)
    # the clients were charged all the same: a failed or aborted round is never free
    assert all(trainer.ledger.steps(c) == 2 for c in range(4))
