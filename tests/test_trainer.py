"""FederatedDPTrainer end to end: every method trains, FedAvg, FFA-LoRA's frozen A, budget, reports, errors."""

import json
import os

import pytest
import torch
from fed_helpers import adapter_state, make_trainer, toy_args, toy_dataset, toy_model

from peft_lalora import ConfigError, FederatedDPTrainer, PrivacyBudgetExceededError
from peft_lalora.federated import LocalConfig, client_update
from peft_lalora.federated.seeding import select_clients

METHODS = ["dplora", "ffa", "rolora", "lalora_nofilter", "lalora"]


@pytest.mark.parametrize("method,dp", [(m, True) for m in METHODS] + [("lalora", False)])
def test_every_method_trains_end_to_end(tmp_path, method, dp):
    # Prepare
    model = toy_model(method)
    base_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n
    }
    adapter_before = adapter_state(model)
    trainer = FederatedDPTrainer(model=model, args=toy_args(tmp_path, dp=dp), train_dataset=toy_dataset())
    # Execute
    out = trainer.train()
    # Assert
    assert out.global_step == 2
    after = dict(model.named_parameters())
    for name, value in base_before.items():
        assert torch.equal(after[name].detach(), value), name
    changed = {n for n, v in adapter_before.items() if not torch.equal(after[n].detach(), v)}
    assert any("lora_B" in n for n in changed) and any("modules_to_save" in n for n in changed)
    if method == "ffa":
        assert not any("lora_A" in n for n in changed), "FFA-LoRA's A must stay at its initialisation"
    elif method != "rolora":  # RoLoRA trains B in round 0 and A in round 1: both moved after 2 rounds
        assert any("lora_A" in n for n in changed)
    else:
        assert any("lora_A" in n for n in changed)
    logged = [log for log in trainer.state.log_history if "round" in log]
    assert [log["round"] for log in logged] == [1.0, 2.0]
    assert ("epsilon" in logged[-1]) == dp
    # no Trainer-style global clipping: no norm of the non-private batch gradient is computed or logged
    assert trainer.args.max_grad_norm == (0.0 if dp else 1.0)
    assert not any("grad_norm" in log for log in trainer.state.log_history)


def test_fedavg_equals_hand_computed_mean_of_client_adapters(tmp_path):
    # Prepare: one round with 3 of 4 clients; the trainer's global adapter after the round ...
    trainer = make_trainer(tmp_path, "dplora", num_rounds=1, clients_per_round=3)
    start = adapter_state(trainer.model)
    trainer.train()
    global_after = adapter_state(trainer.model)
    # ... against each selected client's local adapter, recomputed one by one, and a mean taken by hand
    locals_ = []
    for client in select_clients(0, 0, 4, 3):
        client_update(
            model=trainer.model,
            stepper=trainer.stepper,
            global_state=start,
            round_idx=0,
            client=client,
            lr=0.5,
            local=LocalConfig.from_args(trainer.args),
            private_seed=0,
            shard=trainer.federation.shards[client],
        )
        locals_.append(adapter_state(trainer.model))
    for name in start:
        hand = (
            start[name]
            + (locals_[0][name] - start[name] + locals_[1][name] - start[name] + locals_[2][name] - start[name]) / 3
        )
        torch.testing.assert_close(global_after[name], hand, rtol=0, atol=1e-6)


def test_privacy_report_and_saved_artifacts(tmp_path):
    trainer = make_trainer(tmp_path, target_epsilon=2.0, num_rounds=2)
    trainer.train()
    report = trainer.privacy_report()
    for key in ("epsilon", "delta", "noise_multiplier", "per_sample_max_grad_norm", "accountant", "unit", "clients"):
        assert key in report
    assert report["unit"] == "one example of one client"
    assert report["epsilon"] == max(c["epsilon"] for c in report["clients"])
    assert 0 < report["epsilon"] <= 2.0
    assert report["worst_case_epsilon"] <= 2.0 and report["worst_case_epsilon"] >= 2.0 - 0.05
    assert all(c["steps"] in (0, 2, 4) for c in report["clients"])  # 2 local steps per round taken part in
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors", "privacy_report.json", "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    on_disk = json.loads((tmp_path / "final" / "privacy_report.json").read_text())
    assert on_disk["epsilon"] == pytest.approx(report["epsilon"])


def test_budget_exceeded_is_refused_before_release(tmp_path):
    trainer = make_trainer(tmp_path, target_epsilon=1.0, num_rounds=2)
    trainer.privacy_report()  # sets the federation up (the ledger) before training
    for client in range(4):  # spend the budget behind the trainer's back, one step at a time
        with pytest.raises(PrivacyBudgetExceededError):
            for _ in range(10_000):
                trainer.ledger.charge(client, 1)
    before = adapter_state(trainer.model)
    with pytest.raises(PrivacyBudgetExceededError, match="client"):
        trainer.train()
    after = adapter_state(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"num_clients": 500}, "`num_clients` must be <= the number of training examples"),
        ({"dirichlet_alpha": 0.0}, "`dirichlet_alpha` must be > 0"),
        ({"clients_per_round": 0}, "`clients_per_round` must be an integer >= 1"),
        ({"clients_per_round": 5}, r"`clients_per_round` must be in \[1, num_clients=4\]"),
        (
            {"per_device_train_batch_size": 100},
            "`per_device_train_batch_size` \\(100\\) is the expected Poisson batch",
        ),
        ({"noise_multiplier": None}, "exactly one of `target_epsilon`"),
        ({"target_epsilon": -1.0}, "`target_epsilon` must be > 0"),
        ({"noise_multiplier": -0.5}, "`noise_multiplier` must be >= 0"),
        ({"per_sample_max_grad_norm": 0.0}, "`per_sample_max_grad_norm` must be > 0"),
        ({"target_delta": 1.5}, r"`target_delta` must be in \(0, 1\)"),
        ({"target_delta": 0.1}, "`target_delta` must be < 1 / n_k"),
        ({"gradient_accumulation_steps": 2}, "`gradient_accumulation_steps`=2 is not honoured"),
        ({"accountant": "gdp"}, "GDP is never used"),
        ({"target_epsilon": 1e-4}, "epsilon"),
    ],
)
def test_bad_federated_input(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        overrides = dict(overrides)
        if "noise_multiplier" in overrides and overrides["noise_multiplier"] is None:
            args = toy_args(tmp_path)
            args.noise_multiplier = None
            args.validate()
        trainer = FederatedDPTrainer(
            model=toy_model(), args=toy_args(tmp_path, **overrides), train_dataset=toy_dataset()
        )
        trainer.train()


def test_both_epsilon_and_sigma_refused(tmp_path):
    from peft_lalora import FederatedDPArguments

    with pytest.raises(ConfigError, match="exactly one of `target_epsilon`"):
        FederatedDPArguments(output_dir=str(tmp_path), target_epsilon=1.0, noise_multiplier=1.0, report_to=[])


def test_dp_disables_trainer_global_clipping(tmp_path):
    assert toy_args(tmp_path).max_grad_norm == 0.0
    assert toy_args(tmp_path, dp=False).max_grad_norm == 1.0


def test_model_must_be_lalora(tmp_path):
    from tiny_models import tiny_roberta

    with pytest.raises(ConfigError, match="`model` must be"):
        FederatedDPTrainer(model=tiny_roberta(), args=toy_args(tmp_path), train_dataset=toy_dataset())
