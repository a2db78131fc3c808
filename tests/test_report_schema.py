"""The privacy report's schema (`PrivacyReport`, `schema_version`): what both engines write parses and round-trips
exactly, a report written before the version existed still reads (and the prior-spending reader still reads it),
a missing required key or a newer version is refused naming it, and the card renders from the typed report."""

from __future__ import annotations

import json

import pytest
from fed_helpers import toy_args, toy_dataset, toy_model, toy_shards
from test_card import card_kwargs

from peft_lalora import ConfigError, FederatedDPTrainer
from peft_lalora.hub import render_model_card
from peft_lalora.privacy.prior import read_prior_report
from peft_lalora.privacy.report import SCHEMA_VERSION, PrivacyReport

CLIENT_DP = {"client_dp": True, "client_clip_norm": 0.5, "client_noise_multiplier": 1.0}


@pytest.fixture(scope="module")
def trainer_report(tmp_path_factory):
    """privacy_report.json of a short private run with client-level DP (both entries), as written to disk."""
    out = tmp_path_factory.mktemp("schema")
    trainer = FederatedDPTrainer(model=toy_model(), args=toy_args(out, **CLIENT_DP), train_dataset=toy_dataset())
    trainer.train()
    trainer.save_model()
    return json.loads((out / "privacy_report.json").read_text())


def round_trip(report: dict) -> dict:
    return json.loads(json.dumps(PrivacyReport.from_dict(report).to_dict()))


def test_the_trainers_report_parses_and_round_trips_exactly(trainer_report):
    parsed = PrivacyReport.from_dict(trainer_report)
    assert trainer_report["schema_version"] == SCHEMA_VERSION == parsed.schema_version
    assert parsed.dp is True and parsed.epsilon == max(c["epsilon"] for c in trainer_report["clients"])
    assert parsed.client_level["unit"] == trainer_report["client_level"]["unit"] and parsed.fixed_seed
    assert round_trip(trainer_report) == trainer_report


def test_the_non_private_trainers_report_round_trips(tmp_path):
    trainer = FederatedDPTrainer(model=toy_model(), args=toy_args(tmp_path, dp=False), train_dataset=toy_dataset())
    report = json.loads(json.dumps(trainer.privacy_report()))
    assert report["dp"] is False and report["schema_version"] == SCHEMA_VERSION
    assert round_trip(report) == report


def test_a_report_written_before_the_version_reads_as_version_0(trainer_report, tmp_path):
    # what the previous code wrote: the same keys, without `schema_version`
    older = {k: v for k, v in trainer_report.items() if k != "schema_version"}
    parsed = PrivacyReport.from_dict(older)
    assert parsed.schema_version == 0
    assert {k: v for k, v in round_trip(older).items() if k != "schema_version"} == older
    # the earliest form the card accepted: no `dp`, `unit` nor top-level `epsilon` (derived from the clients)
    minimal = {k: older[k] for k in ("delta", "noise_multiplier", "per_sample_max_grad_norm", "accountant")}
    minimal["clients"] = [{"client": 0, "epsilon": 0.5, "sample_rate": 0.1, "steps": 3}]
    parsed = PrivacyReport.from_dict(minimal)
    assert (parsed.dp, parsed.epsilon, parsed.unit) == (True, 0.5, "one example of one client")
    # the prior-spending reader still reads the older report
    (tmp_path / "privacy_report.json").write_text(json.dumps(older))
    assert read_prior_report(str(tmp_path)).epsilon == older["epsilon"]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r.pop("accountant"), r"`privacy_report` must hold \['accountant'\]"),
        (lambda r: r["clients"][0].pop("steps"), r"`privacy_report\['clients'\]\[0\]` must hold \['steps'\]"),
        (
            lambda r: r["client_level"].pop("client_clip_norm"),
            r"`privacy_report\['client_level'\]` must hold \['client_clip_norm'\]",
        ),
        (lambda r: r.update(schema_version=SCHEMA_VERSION + 1), r"newer than this version of peft_lalora reads"),
        (lambda r: r.update(schema_version="1"), r"`privacy_report\['schema_version'\]` must be a non-negative int"),
    ],
)
def test_a_missing_required_key_or_a_newer_version_is_refused(trainer_report, edit, match):
    report = json.loads(json.dumps(trainer_report))
    edit(report)
    with pytest.raises(ConfigError, match=match):
        PrivacyReport.from_dict(report)


def test_the_prior_reader_refuses_a_newer_version(trainer_report, tmp_path):
    (tmp_path / "privacy_report.json").write_text(json.dumps({**trainer_report, "schema_version": 99}))
    with pytest.raises(ConfigError, match=r"`prior_privacy_report`.*`schema_version` 99, newer"):
        read_prior_report(str(tmp_path))


def test_the_card_renders_from_the_typed_report(trainer_report):
    typed = PrivacyReport.from_dict(trainer_report)
    card = render_model_card(**card_kwargs(privacy_report=typed))
    assert card == render_model_card(**card_kwargs(privacy_report=trainer_report))
    assert "| epsilon (worst-case client) |" in card and f"| {typed.clients[0]['client']} |" in card
    assert "| client-level epsilon |" in card and "Warning: no privacy guarantee" in card  # noise_seed=0


def test_the_flower_report_parses_and_round_trips_exactly(tmp_path):
    pytest.importorskip("flwr", reason="Flower is an optional extra: `pip install '.[flower]'`")
    from test_flower_inprocess import SIZES, read_json, run_config, run_flower

    toy_shards(SIZES, tmp_path / "data")
    run_flower(tmp_path, tmp_path / "data", run_config(tmp_path, **CLIENT_DP))
    report = read_json(tmp_path / "flower" / "privacy_report.json")
    parsed = PrivacyReport.from_dict(report)
    assert (parsed.schema_version, parsed.engine, parsed.dp) == (SCHEMA_VERSION, "flower", True)
    assert parsed.run["rounds_aggregated"] and parsed.client_level is not None
    assert round_trip(report) == report
