"""Client-level DP (DP-FedAvg on the server, `client_dp=True`): the attacks and references of its claims. One
client's update moves the release by at most S / m whatever its size; epsilon is opacus' RDP accountant over
(z, q = m / N, rounds) computed here; the server's noise is no torch stream; clients are sampled at rate m / N;
both engines release the same adapter; the report and the card state which unit is protected."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from fed_helpers import toy_args, toy_dataset, toy_model
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file
from test_flower_inprocess import read_json, run_config, run_flower, shards  # noqa: F401  (shards: the data)
from test_unguessable_noise import SeedRecorder, found_in_torch_stream

import peft_lalora.trainer
from peft_lalora import ConfigError, FederatedDPTrainer, PrivacyBudgetExceededError
from peft_lalora.federated.aggregation import Aggregator
from peft_lalora.federated.client_dp import ClientDPAggregator, sample_clients
from peft_lalora.privacy.client_level import ClientLevelPlan

CLIENT_DP = {"client_dp": True, "client_clip_norm": 0.5, "client_noise_multiplier": 1.0}


def plan(**overrides) -> ClientLevelPlan:
    fields = dict(
        noise_multiplier=0.0,
        clip_norm=0.5,
        sample_rate=0.5,
        expected_clients=3,
        num_clients=6,
        rounds=2,
        delta=1e-5,
    )
    return ClientLevelPlan(**{**fields, **overrides})


def release(deltas: list, global_state: dict, the_plan: ClientLevelPlan) -> dict:
    total = ClientDPAggregator(Aggregator(global_state), the_plan, "root", 0, list(global_state))
    for delta in deltas:
        total.add(delta)
    return total.merged()


def distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a))


def test_one_client_moves_the_release_by_at_most_s_over_m():
    # Prepare: 3 clients' updates (noise off); one of them then scaled by 1000, or left out
    g = torch.Generator().manual_seed(0)
    state = {"l.lora_A.default.weight": torch.zeros(4, 6), "l.lora_B.default.weight": torch.zeros(6, 4)}
    deltas = [{n: 0.1 * torch.randn(t.shape, generator=g) for n, t in state.items()} for _ in range(3)]
    scaled = deltas[:2] + [{n: 1000 * v for n, v in deltas[2].items()}]
    the_plan = plan()
    bound = the_plan.clip_norm / the_plan.expected_clients  # S / m

    # Execute
    base, loud, without = (release(d, state, the_plan) for d in (deltas, scaled, deltas[:2]))

    # Assert: replacing or removing the client moves the release by <= S / m (and the loud one does move it)
    assert 0 < distance(base, loud) <= 2 * bound + 1e-6  # replace: two clipped updates of norm <= S differ by <= 2S
    assert 0 < distance(base, without) <= bound + 1e-6  # add/remove (the accountant's neighbourhood)
    assert distance(without, release(deltas[:2] + [scaled[2]], state, the_plan)) <= bound + 1e-6


def test_epsilon_is_opacus_rdp_over_the_rounds(tmp_path):
    # Prepare: client-level DP alone (sample-level off), N = 4, m = 2, 3 rounds
    args = toy_args(tmp_path, dp=False, num_rounds=3, noise_seed=0, **CLIENT_DP)
    trainer = FederatedDPTrainer(model=toy_model(), args=args, train_dataset=toy_dataset(n=80))

    # Execute
    trainer.train()
    trainer.save_model()
    report = trainer.privacy_report()

    # Assert: the accountant of the test, step by step, gives the reported epsilon
    accountant = RDPAccountant()
    for _ in range(3):
        accountant.step(noise_multiplier=1.0, sample_rate=2 / 4)
    entry = report["client_level"]
    assert entry["unit"] == "client" and entry["rounds"] == 3 and entry["sample_rate"] == 0.5
    assert entry["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert (entry["noise_multiplier"], entry["client_clip_norm"], entry["delta"]) == (1.0, 0.5, 1e-5)
    # ... the logs hold neither the sample's size nor a noise-free loss (both would leak past the guarantee)
    rounds = [log for log in trainer.state.log_history if "round" in log]
    assert len(rounds) == 3 and all("clients" not in log and "loss" not in log for log in rounds)
    assert rounds[-1]["client_epsilon"] == pytest.approx(entry["epsilon"], rel=1e-12)
    # ... the report and the card say which guarantee holds: none per example, client-level only
    assert report["dp"] is False and "NONE" in report["guarantees"][0]
    card = open(tmp_path / "README.md").read()
    assert "No sample-level DP" in card and "Client-level DP" in card and "client-level epsilon" in card


def test_calibrated_z_meets_the_target_and_a_round_beyond_is_refused():
    args = toy_args("unused", dp=False, client_dp=True, client_clip_norm=1.0, client_target_epsilon=8.0, num_rounds=5)
    the_plan = ClientLevelPlan.from_args(args)
    accountant = RDPAccountant()
    accountant.history = [(the_plan.noise_multiplier, 0.5, 5)]
    assert 8.0 - 0.05 <= accountant.get_epsilon(delta=1e-5) <= 8.0
    the_plan.check_release(4)  # the last configured round fits
    with pytest.raises(PrivacyBudgetExceededError, match="round 5"):
        the_plan.check_release(5)


def test_server_noise_is_no_torch_stream(tmp_path, monkeypatch):
    # Prepare: every client sends a zero update, so the release is the server's noise / m; record torch's seeds
    recorder = SeedRecorder(monkeypatch)
    real = peft_lalora.trainer.client_update

    def zero_update(**kwargs):
        update = real(**kwargs)
        return dataclasses.replace(update, delta={n: torch.zeros_like(v) for n, v in update.delta.items()})

    monkeypatch.setattr(peft_lalora.trainer, "client_update", zero_update)
    args = toy_args(tmp_path, dp=False, num_rounds=1, local_steps=1, **{**CLIENT_DP, "client_clip_norm": 1.0})
    model = toy_model("dplora")
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    trainer = FederatedDPTrainer(model=model, args=args, train_dataset=toy_dataset(n=80))

    # Execute: train and recover the noise from the published A
    trainer.train()
    published = dict(trainer.model.named_parameters())
    noises = {n: (published[n].detach() - initial[n]) * args.clients_per_round for n in initial}

    # Assert: it is noise of std z * S = 1, no seed handed to torch re-creates it, and its generator is ChaCha20
    flat = torch.cat([v.flatten() for v in noises.values()])
    assert flat.std().item() == pytest.approx(1.0, rel=0.15)
    candidates = recorder.seeds + [s & 0xFFFFFFFF for s in recorder.seeds]
    for name, noise in noises.items():
        assert found_in_torch_stream(noise, candidates, std=1.0) == [], name
    assert trainer.round_policy.private_root != args.seed and isinstance(trainer.round_policy.private_root, str)


def test_clients_are_sampled_at_rate_m_over_n():
    rounds, n, q = 2000, 10, 0.3
    counts = [0] * n
    for r in range(rounds):
        for k in sample_clients("root", r, n, q):
            counts[k] += 1
    tolerance = 4 * math.sqrt(q * (1 - q) / rounds)  # 4 standard deviations of a binomial frequency
    assert all(abs(c / rounds - q) <= tolerance for c in counts), counts
    sizes = [len(sample_clients("root", r, n, q)) for r in range(rounds)]
    assert len(set(sizes)) > 3  # Poisson: the round's size varies (a fixed-size sample would not)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"client_dp": True, "client_noise_multiplier": 1.0}, "needs `client_clip_norm`"),
        ({"client_dp": True, "client_clip_norm": 1.0}, "exactly one of `client_target_epsilon`"),
        ({**CLIENT_DP, "aggregation": "trimmed_mean"}, "needs `aggregation='mean'`"),
        ({**CLIENT_DP, "client_target_delta": 0.5}, "`client_target_delta` must be in"),
        ({"client_clip_norm": 1.0}, "without `client_dp=True`"),
    ],
)
def test_bad_client_dp_settings_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        toy_args("unused", **overrides)


def test_both_engines_release_the_same_client_level_adapter(tmp_path, shards):  # noqa: F811
    # Prepare: sample-level and client-level DP together, fixed noise seed on both engines
    root, datasets = shards
    settings = {**CLIENT_DP, "num_rounds": 3}
    trainer = FederatedDPTrainer(
        model=toy_model(), args=toy_args(tmp_path / "t", **settings), client_datasets=datasets
    )

    # Execute
    trainer.train()
    trainer.save_model()
    run_flower(tmp_path, root, run_config(tmp_path, **settings))

    # Assert: the same adapter (1e-6), the same client-level entry, and per-client epsilons that hide participation
    ours = load_file(str(tmp_path / "flower" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "t" / "adapter_model.safetensors"))
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0)
    flower, local = read_json(tmp_path / "flower" / "privacy_report.json"), trainer.privacy_report()
    assert flower["client_level"]["epsilon"] == pytest.approx(local["client_level"]["epsilon"], rel=1e-12)
    every_round = {c["client"]: c["epsilon"] for c in local["clients"]}
    assert {c["client"]: c["epsilon"] for c in flower["clients"]} == pytest.approx(every_round, rel=1e-9)
    assert all(c["steps"] == 3 * 2 for c in flower["clients"] + local["clients"])


def test_resume_re_creates_the_client_sample_and_noise(tmp_path):
    # Prepare: sample-level and client-level DP, an uninterrupted run and one killed after its first round
    from test_trainer_resume import KillAfterRound, final_adapter_sha, trainer_for

    full = trainer_for(tmp_path / "full", **CLIENT_DP)
    full.train()
    killed = trainer_for(tmp_path / "killed", callbacks=[KillAfterRound(1)], **CLIENT_DP)
    with pytest.raises(KeyboardInterrupt):
        killed.train()

    # Execute
    resumed = trainer_for(tmp_path / "killed", **CLIENT_DP)
    resumed.train(resume_from_checkpoint=True)

    # Assert: the same adapter, ledger (every client charged every round) and client-level epsilon
    assert final_adapter_sha(resumed, tmp_path / "r") == final_adapter_sha(full, tmp_path / "f")
    assert resumed.ledger.state_dict() == full.ledger.state_dict()
    assert all(c["steps"] == 3 * 2 for c in resumed.privacy_report()["clients"])
    assert resumed.privacy_report()["client_level"]["epsilon"] == full.privacy_report()["client_level"]["epsilon"]
