"""Spending that the report must not forget: an adapter trained under DP, loaded with `PeftModel.from_pretrained(...,
is_trainable=True)` and trained again. Undeclared, the report, the card and a warning say the earlier epsilon is not
included; declared the same data, both runs' events are composed, checked against opacus' RDPAccountant fed the same
events by hand."""

import json
import warnings

import pytest
from fed_helpers import toy_args, toy_dataset, toy_model
from opacus.accountants import RDPAccountant
from peft import PeftModel
from tiny_models import tiny_roberta
from transformers import TrainerCallback

from peft_lalora import FederatedDPTrainer
from peft_lalora.errors import ConfigError, LALoraWarning
from peft_lalora.federated.seeding import select_clients

DELTA = 1e-5
BATCH, SHARD = 8, 60  # toy_dataset(): 240 examples, 4 IID clients


def train_and_save(out, model=None, **overrides):
    args = toy_args(out, noise_seed=None, target_delta=DELTA, **overrides)
    trainer = FederatedDPTrainer(model=model or toy_model(), args=args, train_dataset=toy_dataset())
    trainer.train()
    trainer.save_model()
    return trainer, json.loads((out / "privacy_report.json").read_text())


def loaded(folder):
    return PeftModel.from_pretrained(tiny_roberta(0), str(folder), is_trainable=True)


def events(seed, sigma, rounds=2, clients=4, per_round=2, local_steps=2):
    """{client: [(sigma, q, steps)]} of a toy run, from its public schedule."""
    steps = dict.fromkeys(range(clients), 0)
    for r in range(rounds):
        for c in select_clients(seed, r, clients, per_round):
            steps[c] += local_steps
    return {c: [(sigma, BATCH / SHARD, n)] for c, n in steps.items() if n}


def opacus_epsilon(*histories):
    acc = RDPAccountant()
    for history in histories:
        for sigma, q, n in history:
            for _ in range(n):
                acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=DELTA) if acc.history else 0.0


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("first")
    _, report = train_and_save(out, noise_multiplier=1.0)
    assert {c["sample_rate"] for c in report["clients"]} == {BATCH / SHARD}
    return out, report


def card_privacy(folder) -> str:
    return (folder / "README.md").read_text().split("## Privacy", 1)[1].split("\n## ", 1)[0]


# -- (a) not declared: said plainly ------------------------------------------------------------------------------
def test_undeclared_earlier_spending_is_said_not_included(first, tmp_path):
    # Prepare
    folder, report1 = first
    # Execute
    with pytest.warns(LALoraWarning, match=r"spent epsilon = .* NOT included") as record:
        _, report = train_and_save(tmp_path, model=loaded(folder), noise_multiplier=1.3)
    # Assert: this run's epsilon alone, and the earlier one named in report, card and warning
    assert any(f"{report1['epsilon']:.4g}" in str(w.message) for w in record)
    earlier = report["earlier_spending"]
    assert earlier["included"] is False and earlier["epsilon"] == report1["epsilon"] and earlier["dp"] is True
    assert earlier["source"] == folder.name and "/" not in earlier["source"]  # no local path published
    expected = max(opacus_epsilon(h) for h in events(0, 1.3).values())
    assert report["epsilon"] == pytest.approx(expected, abs=1e-6)
    privacy = card_privacy(tmp_path)
    assert f"epsilon = {report1['epsilon']:.4g}" in privacy and "NOT included" in privacy


def test_a_new_adapter_has_no_earlier_spending(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LALoraWarning)
        _, report = train_and_save(tmp_path, noise_multiplier=1.0)
    assert "earlier_spending" not in report and "NOT included" not in card_privacy(tmp_path)
    assert "adapter_source" not in (tmp_path / "adapter_config.json").read_text()


# -- (b) declared the same data: composed ------------------------------------------------------------------------
def test_same_data_composes_per_client_against_opacus(first, tmp_path):
    # Prepare
    folder, report1 = first
    before, now = events(0, 1.0), events(0, 1.3)
    # Execute
    _, report = train_and_save(tmp_path, model=loaded(folder), noise_multiplier=1.3, prior_privacy_same_data=True)
    # Assert: each client continues its own accountant; the total beats either run alone
    assert report["earlier_spending"]["included"] is True
    assert report["earlier_spending"]["composition"] == "per_client"
    for entry in report["clients"]:
        c = entry["client"]
        assert entry["epsilon"] == pytest.approx(opacus_epsilon(before.get(c, []), now.get(c, [])), abs=1e-6)
    total = max(opacus_epsilon(before.get(c, []), now.get(c, [])) for c in range(4))
    assert report["epsilon"] == pytest.approx(total, abs=1e-6)
    alone = max(opacus_epsilon(h) for h in now.values())
    assert report["epsilon"] > report1["epsilon"] and report["epsilon"] > alone
    assert "**includes** the earlier run" in card_privacy(tmp_path)


def test_a_composed_report_composes_again(first, tmp_path):
    # Prepare: run 2 composes run 1; run 3 starts from run 2's adapter
    folder, _ = first
    train_and_save(tmp_path / "2", model=loaded(folder), noise_multiplier=1.3, prior_privacy_same_data=True)
    # Execute
    _, report = train_and_save(
        tmp_path / "3", model=loaded(tmp_path / "2"), noise_multiplier=2.0, prior_privacy_same_data=True
    )
    # Assert: three runs' events per client (run 2's report kept each client's history)
    runs = [events(0, 1.0), events(0, 1.3), events(0, 2.0)]
    total = max(opacus_epsilon(*(r.get(c, []) for r in runs)) for c in range(4))
    assert report["epsilon"] == pytest.approx(total, abs=1e-6)


def test_another_partition_composes_the_worst_earlier_client_into_every_client(first, tmp_path):
    # Prepare: another seed splits the same data otherwise: client k's examples may have been any earlier client's
    folder, _ = first
    before, now = events(0, 1.0), events(1, 1.3)
    # Execute
    _, report = train_and_save(
        tmp_path, model=loaded(folder), noise_multiplier=1.3, seed=1, prior_privacy_same_data=True
    )
    # Assert
    assert report["earlier_spending"]["composition"] == "worst_case"
    for entry in report["clients"]:
        worst = max(opacus_epsilon(h, now.get(entry["client"], [])) for h in before.values())
        assert entry["epsilon"] == pytest.approx(worst, abs=1e-6)


def test_an_explicit_report_path_is_used(first, tmp_path):
    folder, report1 = first
    _, report = train_and_save(
        tmp_path,
        noise_multiplier=1.3,
        prior_privacy_report=str(folder / "privacy_report.json"),
        prior_privacy_same_data=True,
    )
    assert report["earlier_spending"]["epsilon"] == report1["epsilon"] and report["epsilon"] > report1["epsilon"]


def test_target_epsilon_below_the_composed_spending_is_refused_before_training(first, tmp_path):
    folder, report1 = first
    args = toy_args(tmp_path, noise_seed=None, target_delta=DELTA, target_epsilon=report1["epsilon"] * 1.01)
    args.prior_privacy_same_data = True
    trainer = FederatedDPTrainer(model=loaded(folder), args=args, train_dataset=toy_dataset())
    with pytest.raises(ConfigError, match=r"`target_epsilon` = .* cannot be met with the earlier run's spending"):
        trainer.train()


# -- (c) bad prior reports: clear errors -------------------------------------------------------------------------
@pytest.mark.parametrize("content", [None, "not json", json.dumps({"clients": []})])
def test_a_bad_prior_report_path_names_the_argument(tmp_path, content):
    path = tmp_path / "privacy_report.json"
    if content is not None:
        path.write_text(content)
    args = toy_args(tmp_path / "out", noise_seed=None, prior_privacy_report=str(path))
    trainer = FederatedDPTrainer(model=toy_model(), args=args, train_dataset=toy_dataset())
    with pytest.raises(ConfigError, match=r"`prior_privacy_report` = '.*privacy_report.json'"):
        trainer.train()


def test_a_report_without_client_events_refuses_composition(first, tmp_path):
    folder, report1 = first
    path = tmp_path / "privacy_report.json"
    path.write_text(json.dumps({k: v for k, v in report1.items() if k != "clients"}))
    args = toy_args(tmp_path / "out", noise_seed=None, prior_privacy_report=str(path))
    args.prior_privacy_same_data = True
    trainer = FederatedDPTrainer(model=loaded(folder), args=args, train_dataset=toy_dataset())
    with pytest.raises(ConfigError, match="cannot be composed: it has no per-client entries"):
        trainer.train()


def test_same_data_without_an_earlier_report_is_refused(tmp_path):
    trainer = FederatedDPTrainer(
        model=toy_model(), args=toy_args(tmp_path, prior_privacy_same_data=True), train_dataset=toy_dataset()
    )
    with pytest.raises(ConfigError, match="`prior_privacy_same_data`=True, but no earlier privacy report"):
        trainer.train()


# -- a non-private earlier run -----------------------------------------------------------------------------------
def test_a_non_private_earlier_run_is_said_and_cannot_be_composed(tmp_path):
    # Prepare: the first run without DP
    args = toy_args(tmp_path / "np", dp=False)
    trainer = FederatedDPTrainer(model=toy_model(), args=args, train_dataset=toy_dataset())
    trainer.train()
    trainer.save_model()
    # Execute / Assert: undeclared, said; declared, refused (nothing to compose: no finite epsilon holds)
    with pytest.warns(LALoraWarning, match="trained WITHOUT differential privacy"):
        _, report = train_and_save(tmp_path / "dp", model=loaded(tmp_path / "np"), noise_multiplier=1.0)
    assert report["earlier_spending"]["dp"] is False and report["earlier_spending"]["included"] is False
    assert "trained **without** differential privacy" in card_privacy(tmp_path / "dp")
    args = toy_args(tmp_path / "dp2", noise_seed=None, prior_privacy_same_data=True)
    trainer = FederatedDPTrainer(model=loaded(tmp_path / "np"), args=args, train_dataset=toy_dataset())
    with pytest.raises(ConfigError, match="was not private"):
        trainer.train()


# -- resume of a composed run ------------------------------------------------------------------------------------
class KillAfterRound(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            raise KeyboardInterrupt("killed after round 1")


def test_a_composed_run_resumes_with_the_earlier_steps_counted(first, tmp_path):
    # Prepare: the composed run, uninterrupted and killed after round 1
    folder, _ = first

    def composed(out, callbacks=None):
        args = toy_args(out, noise_multiplier=1.3, prior_privacy_same_data=True)
        return FederatedDPTrainer(model=loaded(folder), args=args, train_dataset=toy_dataset(), callbacks=callbacks)

    full = composed(tmp_path / "full")
    full.train()
    killed = composed(tmp_path / "killed", callbacks=[KillAfterRound()])
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    # Execute
    resumed = composed(tmp_path / "killed")
    resumed.train(resume_from_checkpoint=True)
    # Assert: the checkpoint's ledger (earlier steps included) passes the schedule check and ends where the full run did
    assert resumed.ledger.state_dict() == full.ledger.state_dict()
    assert resumed.privacy_report()["epsilon"] == full.privacy_report()["epsilon"]


# -- a Hub adapter: offline only ---------------------------------------------------------------------------------
def test_a_hub_adapter_whose_report_is_not_cached_is_said_unchecked(tmp_path):
    # Prepare: what `LALoraConfig.from_pretrained` records for a Hub adapter without a cached privacy report
    model = toy_model()
    model.peft_config["default"].adapter_source = {"hub_repo": "alice/lalora-sst2", "folder": None}
    # Execute
    with pytest.warns(LALoraWarning, match="'alice/lalora-sst2'.*not checked"):
        _, report = train_and_save(tmp_path, model=model, noise_multiplier=1.0)
    # Assert
    assert report["earlier_spending"] == {"included": False, "source": "alice/lalora-sst2", "checked": False}
    assert "was not checked, and it is NOT included" in card_privacy(tmp_path)


def test_a_cached_hub_report_is_found_and_named_by_its_repo(first, tmp_path):
    folder, report1 = first
    model = toy_model()
    model.peft_config["default"].adapter_source = {"hub_repo": "alice/lalora-sst2", "folder": str(folder)}
    _, report = train_and_save(tmp_path, model=model, noise_multiplier=1.3, prior_privacy_same_data=True)
    assert report["earlier_spending"]["source"] == "alice/lalora-sst2"
    assert report["earlier_spending"]["epsilon"] == report1["epsilon"]
