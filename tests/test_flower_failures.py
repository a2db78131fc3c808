"""Runs that fail say so (RELIABILITY R25), in-process (the real ServerApp and ClientApp through the Grid double):
a run that aggregated nothing raises and publishes nothing; a run that aggregated some rounds publishes them with a
card and a report that state the rounds that really happened; a run whose quorum became unreachable stops asking
the survivors; a run that loses its SuperLink raises and keeps the report of what the clients charged.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: `pip install '.[flower]'` (CI installs it)")

from test_flower_inprocess import read_json, run_config, run_flower, shards  # noqa: E402, F401
from test_hub import hub  # noqa: E402, F401  (the fake Hub fixture)

from peft_lalora import ConfigError  # noqa: E402
from peft_lalora.flower import ClientState, FlowerRunError, QuorumUnreachable  # noqa: E402
from peft_lalora.owner.run_config import federated_args, server_setting  # noqa: E402

PUBLISHED = {"adapter_model.safetensors", "adapter_config.json", "README.md"}


def two_of_two(tmp_path, **overrides) -> dict:
    """Clients 0 and 1 in every round (seed 0), both needed: a dead client aborts the round."""
    config = run_config(tmp_path, num_clients=2, clients_per_round=2, min_clients_per_round=2, noise_seed=None)
    config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return config


def before_train_push(monkeypatch, hook) -> None:
    """Call `hook()` before the in-process grid sends each round's train messages (it may raise, as a lost link)."""
    from flower_grid import InProcessGrid

    original = InProcessGrid.push_messages

    def push(self, messages):
        messages = list(messages)
        if any(m.metadata.message_type == "train" for m in messages):
            hook()
        return original(self, messages)

    monkeypatch.setattr(InProcessGrid, "push_messages", push)


def charged_rounds(tmp_path, k: int) -> list:
    return [c["round"] for c in (ClientState(str(tmp_path / "state" / str(k))).saved() or {"charges": []})["charges"]]


def test_every_round_aborted_raises_and_publishes_nothing(tmp_path, shards, hub):  # noqa: F811
    # Prepare: client 1's SuperNode never answers; the quorum is 2 of 2; the run never stops early
    root, _ = shards
    config = dict(two_of_two(tmp_path, max_aborted_rounds=0), **{"push-to-hub": True, "hub-model-id": "alice/x"})

    # Execute
    with pytest.raises(FlowerRunError, match=r"No round of the 2 was aggregated.*Rounds lost: \[0, 1\]"):
        run_flower(tmp_path, root, config, lifetimes={1: 0})

    # Assert: no adapter, no card, no push; the report says which rounds were lost and what client 0 charged
    out = tmp_path / "flower"
    assert not PUBLISHED & set(os.listdir(out)) and hub.repos == {}
    report = read_json(out / "privacy_report.json")
    assert report["run"]["rounds_aggregated"] == [] and sorted(report["run"]["rounds_lost"]) == ["0", "1"]
    assert charged_rounds(tmp_path, 0) == [0, 1] and report["clients"][0]["client"] == 0
    assert report["unreported"] == {"1": [0, 1]}


def test_every_client_refused_by_its_budget_publishes_nothing(tmp_path, shards):  # noqa: F811
    # Prepare: a first run spends both clients' budgets
    root, _ = shards
    config = run_config(tmp_path, num_clients=2, clients_per_round=2, target_epsilon=3.0, noise_seed=None)
    run_flower(tmp_path, root, config)

    # Execute: a second run, refused by both ledgers
    with pytest.raises(FlowerRunError, match="No round of the 2 was aggregated.*budget exceeded"):
        run_flower(tmp_path, root, dict(config, **{"output-dir": str(tmp_path / "second")}), run_id=2)

    # Assert
    assert not PUBLISHED & set(os.listdir(tmp_path / "second"))
    assert len(read_json(tmp_path / "second" / "privacy_report.json")["refused"]) == 4


def test_one_aggregated_round_of_three_is_published_as_one_round(tmp_path, shards, hub):  # noqa: F811
    # Prepare: client 1 answers round 0, then dies; rounds 1 and 2 abort (2 of 2); the run does not stop early
    root, _ = shards
    config = dict(two_of_two(tmp_path, num_rounds=3, max_aborted_rounds=0))
    config.update({"push-to-hub": True, "hub-model-id": "alice/one"})

    # Execute
    run_flower(tmp_path, root, config, lifetimes={1: 1})

    # Assert: published, and the card and the report state 1 aggregated round of 3 and the 2 lost
    out = tmp_path / "flower"
    assert PUBLISHED <= set(os.listdir(out)) and hub.repos["alice/one"].commits
    card = (out / "README.md").read_text()
    assert "1 aggregated of 3 configured (rounds lost: [1, 2])" in card
    run = read_json(out / "privacy_report.json")["run"]
    assert run["status"] == "completed" and run["rounds_aggregated"] == [0]
    assert sorted(run["rounds_lost"]) == ["1", "2"] and "client 1: no reply" in run["rounds_lost"]["1"]


def test_run_stops_when_its_quorum_is_unreachable_and_the_survivor_pays_no_more(tmp_path, shards, hub):  # noqa: F811
    # Prepare: client 1 answers round 0, then dies; 6 rounds of 2 of 2; stop after 2 consecutive aborted rounds
    root, _ = shards
    config = dict(two_of_two(tmp_path, num_rounds=6), **{"push-to-hub": True, "hub-model-id": "alice/stop"})

    # Execute
    with pytest.raises(QuorumUnreachable, match="2 consecutive rounds.*`max-aborted-rounds` = 2"):
        run_flower(tmp_path, root, config, lifetimes={1: 1})

    # Assert: client 0 charged rounds 0-2 and was asked for nothing after; the adapter of round 0 is kept on disk,
    # not pushed; the report says the run stopped and which rounds were lost or never run
    assert charged_rounds(tmp_path, 0) == [0, 1, 2] and charged_rounds(tmp_path, 1) == [0]
    out = tmp_path / "flower"
    run = read_json(out / "privacy_report.json")["run"]
    assert run["status"] == "stopped" and run["rounds_aggregated"] == [0]
    assert sorted(run["rounds_lost"]) == ["1", "2", "3", "4", "5"]
    assert run["rounds_lost"]["3"].startswith("not run")
    assert "1 aggregated of 6 configured" in (out / "README.md").read_text() and hub.repos == {}
    assert len(read_json(out / "flower_history.json")) == 3


def test_rounds_below_quorum_online_are_not_sent_and_the_run_stops(tmp_path, shards, monkeypatch):  # noqa: F811
    # Prepare: client 1's SuperNode leaves the federation after round 0 (Flower lists only online nodes)
    from flower_grid import InProcessGrid

    root, _ = shards
    listed = InProcessGrid.get_node_ids

    def online(self):
        trained = sum(1 for node, kind in self.sent if node == 101 and kind == "train")
        return [n for n in listed(self) if n != 101 or not trained]

    monkeypatch.setattr(InProcessGrid, "get_node_ids", online)

    # Execute
    with pytest.raises(QuorumUnreachable, match="2 consecutive rounds"):
        run_flower(tmp_path, root, two_of_two(tmp_path, num_rounds=5), lifetimes={1: 1})

    # Assert: rounds 1 and 2 were aborted before anything was sent: client 0 paid round 0 only
    assert charged_rounds(tmp_path, 0) == [0] and charged_rounds(tmp_path, 1) == [0]
    history = read_json(tmp_path / "flower" / "flower_history.json")
    assert [h["aborted"] for h in history] == [False, True, True]
    assert history[1]["failed"]["1"] == "no SuperNode online with this partition-id"


def test_a_lost_superlink_raises_and_keeps_what_the_clients_charged(tmp_path, shards, monkeypatch):  # noqa: F811
    # Prepare: the grid fails in round 1, as Flower's grid does when the SuperLink restarts (its run is gone)
    root, _ = shards
    calls = []

    def on_train():
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("the SuperLink closed the connection")

    before_train_push(monkeypatch, on_train)

    # Execute
    with pytest.raises(
        FlowerRunError, match="The run failed during its rounds .*SuperLink.*ConnectionError.*Rounds lost: \\[1, 2\\]"
    ):
        run_flower(tmp_path, root, run_config(tmp_path, num_rounds=3, noise_seed=None))

    # Assert: round 0's charges are on the ledgers and in the report, rounds 1 and 2 are reported lost
    run = read_json(tmp_path / "flower" / "privacy_report.json")["run"]
    assert run["status"] == "failed" and run["rounds_aggregated"] == [0] and "ConnectionError" in run["error"]
    assert sorted(run["rounds_lost"]) == ["1", "2"]


def test_run_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="`max-aborted-rounds` must be an integer >= 0.*-1"):
        server_setting({"max-aborted-rounds": -1}, "max-aborted-rounds")
    with pytest.raises(ConfigError, match="run-config key `num-rounds` = 0"):
        federated_args({"num-rounds": 0})
    with pytest.raises(ConfigError, match="num-round"):
        federated_args({"num-round": 3})


def test_check_config_names_what_the_superlink_refuses_with_code_15(tmp_path):
    # Prepare: an app folder that declares the toy job's keys (as the deploy tests write it)
    from flower_deploy import write_toy_app

    from peft_lalora.flower.check_config import check_run_config, main

    app = write_toy_app(str(tmp_path / "app"), {"method": "lalora", "num-rounds": 2, "noise-multiplier": 1.0})

    # Execute / Assert: an undeclared key (Flower's code 15), a bad value, a good override
    with pytest.raises(ConfigError, match=r"\['num-round'\] are not declared.*code: 15"):
        check_run_config(app, ["num-round=3"])
    with pytest.raises(ConfigError, match="run-config key `num-rounds` = 0"):
        check_run_config(app, ["num-rounds=0"])
    assert check_run_config(app, ["num-rounds=3"])["num-rounds"] == 3
    assert main([app, "-c", "num-round=3"]) == 2 and main([app, "-c", "num-rounds=3"]) == 0


def test_the_history_is_on_disk_before_round_0_is_sent(tmp_path, shards, monkeypatch):  # noqa: F811
    # A ServerApp killed with its SuperLink in round 0 writes no report: `flower_history.json` must already say that
    # no round finished, for `peft_lalora.flower.run` to name round 0 as lost (a restart test covers the later rounds)
    root, _ = shards
    seen = []
    before_train_push(monkeypatch, lambda: seen or seen.append(read_json(tmp_path / "flower" / "flower_history.json")))
    run_flower(tmp_path, root, run_config(tmp_path, num_rounds=1))
    assert seen == [[]]
    assert [h["round"] for h in read_json(tmp_path / "flower" / "flower_history.json")] == [0]
