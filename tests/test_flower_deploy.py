"""The real engine on 127.0.0.1: `flower-superlink` with TLS and SuperNode authentication, two `flower-supernode`s
with registered keys, jobs submitted with `flwr run`. Every process is stopped by PID, children included.

One SuperLink per test; each job runs a tiny RoBERTa (tests/fed_helpers.py) for a few rounds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: `pip install '.[flower]'` (CI installs it)")

import torch  # noqa: E402
from fed_helpers import toy_args, toy_model, toy_shards  # noqa: E402
from flower_deploy import UNREGISTERED_EXIT_CODE, Deployment, flwr_bin, make_node_key, write_toy_app  # noqa: E402
from peft import PeftModel, get_peft_model_state_dict  # noqa: E402
from tiny_models import tiny_roberta  # noqa: E402

import peft_lalora  # noqa: E402, F401
from peft_lalora import FederatedDPTrainer  # noqa: E402
from peft_lalora.flower import ClientState  # noqa: E402

pytestmark = pytest.mark.processes  # starts servers or processes: `pytest -m processes` (CI runs it)

SIZES = (100, 120)
JOB = {
    "method": "lalora",
    "num-clients": 2,
    "clients-per-round": 2,
    "min-clients-per-round": 1,
    "num-rounds": 2,
    "local-steps": 2,
    "batch-size": 8,
    "learning-rate": 0.5,
    "per-sample-max-grad-norm": 1.0,
    "seed": 0,
    "output-dir": "out",
    "round-timeout": 120,
    "node-wait-timeout": 120,
}


@pytest.fixture
def deployment(tmp_path):
    deploy = Deployment(str(tmp_path / "deploy"))
    toy_shards(SIZES, tmp_path / "data")
    deploy.start_superlink()
    try:
        yield deploy
    finally:
        deploy.close()
        assert not deploy.procs


def node_config(tmp_path, k: int) -> dict:
    # the owner allows a fixed noise seed: the first test's job fixes it to compare with the in-process trainer
    return {
        "partition-id": k,
        "data-path": str(tmp_path / "data" / str(k)),
        "state-dir": str(tmp_path / f"state{k}"),
        "allow-fixed-noise-seed": True,
    }


def start_node(deploy, tmp_path, k: int, *, register: bool = True):
    key, public = (os.path.join(deploy.root, f"node{k}"), os.path.join(deploy.root, f"node{k}.pub"))
    if not os.path.exists(key):
        key, public = make_node_key(deploy.root, f"node{k}")
        if register:
            deploy.register(public)
    return deploy.start_supernode(f"node{k}", key, node_config(tmp_path, k))


def run_job(deploy, tmp_path, name: str, app_config: dict, *, fails: str | None = None, **overrides) -> dict:
    """Run a job to its end; with `fails`, the ServerApp must have failed with that text in its status details."""
    app = write_toy_app(str(tmp_path / f"app_{name}"), app_config)
    out = deploy.run(app, {"output-dir": str(tmp_path / name), **overrides})
    deploy.record_children()
    # `flwr run --stream` exits 0 whatever became of the run (Flower 1.42): the run's status says how it ended
    assert out.returncode == 0, f"flwr run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    status, details = run_status(deploy, out.stdout)
    if fails is None:
        assert status == "finished:completed", f"{status}: {details}"
    else:
        assert status == "finished:failed" and fails in details, f"{status}: {details}"
    assert (tmp_path / name / "privacy_report.json").exists(), out.stdout[-5000:] + deploy.log("superlink")[-5000:]
    return json.loads((tmp_path / name / "privacy_report.json").read_text())


def run_status(deploy, stdout: str) -> tuple:
    """(status, status details) of the run `flwr run` started, from `flwr ls --run-id N --format json`."""
    run_id = re.search(r"Successfully started run (\d+)", stdout).group(1)
    listed = deploy.flwr("ls", "local", "--run-id", run_id, "--format", "json")
    (run,) = json.loads(listed.stdout)["runs"]
    return run["status"], run["status-details"]


def history(tmp_path, name: str) -> list:
    return json.loads((tmp_path / name / "flower_history.json").read_text())


def test_two_supernodes_with_tls_and_node_auth_run_a_job(deployment, tmp_path):
    # Prepare: two registered SuperNodes, each with its own shard and state folder; the noise seed is fixed so
    # that the job can be compared with the in-process trainer
    for k in range(2):
        start_node(deployment, tmp_path, k)
    config = dict(JOB, **{"noise-multiplier": 1.0, "noise-seed": 0})

    # Execute
    report = run_job(deployment, tmp_path, "job", config)

    # Assert: the adapter loads with peft and equals the in-process trainer's (<= 1e-6)
    out = tmp_path / "job"
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(tiny_roberta(0), str(out)))
    trainer = FederatedDPTrainer(
        model=toy_model("lalora"),
        args=toy_args(tmp_path / "trainer", num_clients=2),
        client_datasets=toy_shards(SIZES),
    )
    trainer.train()
    expected = get_peft_model_state_dict(trainer.model)
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name], value, atol=1e-6, rtol=0)
    # Assert: each client's ledger on its own disk agrees with the report (2 rounds x 2 steps, both clients)
    assert [c["client"] for c in report["clients"]] == [0, 1]
    for entry in report["clients"]:
        state = ClientState(str(tmp_path / f"state{entry['client']}"))
        charges = state.saved()["charges"]
        assert [c["round"] for c in charges] == [0, 1] and len({c["run_id"] for c in charges}) == 1
        assert entry["steps"] == 4 and entry["epsilon"] == pytest.approx(state.epsilon(), rel=1e-12)
    assert report["epsilon"] == pytest.approx(max(c["epsilon"] for c in report["clients"]), rel=1e-12)
    assert all(h["bytes_sent"] and not h["failed"] for h in history(tmp_path, "job"))


def test_supernode_restarted_between_runs_keeps_its_ledger(deployment, tmp_path):
    # Prepare: a first run spends both clients' budgets (epsilon 3, both in every round, secret randomness)
    for k in range(2):
        start_node(deployment, tmp_path, k)
    config = dict(JOB, **{"target-epsilon": 3.0, "num-rounds": 1})
    first = run_job(deployment, tmp_path, "first", config)
    states = [ClientState(str(tmp_path / f"state{k}")) for k in range(2)]
    spent = [s.saved() for s in states]

    # Execute: restart SuperNode 0 (same key, same state folder), then a second run
    deployment.stop("node0")
    start_node(deployment, tmp_path, 0)
    second = run_job(deployment, tmp_path, "second", config, fails="No round of the 1 was aggregated")

    # Assert: both refused, nothing charged, released or published; the secret roots stayed on the nodes
    assert all(2.9 < c["epsilon"] <= 3.0 for c in first["clients"])
    assert [s.saved() for s in states] == spent
    assert {(r["client"], r["round"]) for r in second["refused"]} == {(0, 0), (1, 0)}
    assert all(h["aborted"] for h in history(tmp_path, "second"))
    assert not {"adapter_model.safetensors", "README.md"} & set(os.listdir(tmp_path / "second"))
    secrets = [
        v for k in range(2) for v in json.loads((tmp_path / f"state{k}" / "secret.json").read_text())["runs"].values()
    ]
    published = "".join(
        (tmp_path / run / f).read_text(errors="replace")
        for run in ("first", "second")
        for f in os.listdir(tmp_path / run)
        if not f.endswith(".safetensors")
    )
    assert len(set(secrets)) == 4 and not any(s in published for s in secrets)  # one per node and run


def run_and_kill(deploy, tmp_path, name: str, app_config: dict, k: int) -> tuple:
    """Submit a job, SIGKILL SuperNode `k` (and its ClientApp) as soon as it has charged its first round, and wait
    for the job to finish; returns the run's (status, status details)."""
    app = write_toy_app(str(tmp_path / f"app_{name}"), app_config)
    log = tmp_path / f"{name}.out"
    with open(log, "wb") as out:
        job = subprocess.Popen(
            [flwr_bin(), "run", app, "local", "--stream", "--run-config", f'output-dir="{tmp_path / name}"'],
            env=deploy.env,
            cwd=deploy.root,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        state, charges, deadline = ClientState(str(tmp_path / f"state{k}")), None, time.time() + 600
        before = len((state.saved() or {"charges": []})["charges"])
        while time.time() < deadline:  # poll for the charge: no fixed sleep, whatever the machine's load
            deploy.record_children()
            charges = (state.saved() or {"charges": []})["charges"]
            if len(charges) > before:
                break
            time.sleep(0.1)
        deploy.stop(f"node{k}", sig=signal.SIGKILL)
        assert job.wait(timeout=1200) == 0  # Flower 1.42's `flwr run --stream` exits 0 even for a failed run
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return run_status(deploy, log.read_text(errors="replace"))


# Slow (a killed node is declared offline after two missed heartbeats, ~60 s): the round timeout is far above it,
# so that the SuperLink's "node unavailable" reply, not the timeout, ends the round however loaded the machine is
def test_supernode_killed_mid_run(deployment, tmp_path):
    # Prepare: two SuperNodes; SuperNode 1 will be killed (SIGKILL) right after it charged round 0
    for k in range(2):
        start_node(deployment, tmp_path, k)
    job = dict(JOB, **{"noise-multiplier": 1.0, "round-timeout": 600})

    # Execute: a 3-round job that may continue with one client
    status = run_and_kill(deployment, tmp_path, "survive", dict(job, **{"num-rounds": 3}), 1)

    # Assert: every round released client 0's update; client 1's charge is on its disk, and the report says it
    # was sent round 0 but never reported
    assert status[0] == "finished:completed", status
    rounds = history(tmp_path, "survive")
    assert [h["survivors"] for h in rounds] == [[0], [0], [0]] and not any(h["aborted"] for h in rounds)
    assert len({h["adapter_sha256"] for h in rounds}) == 3
    report = json.loads((tmp_path / "survive" / "privacy_report.json").read_text())
    assert [c["client"] for c in report["clients"]] == [0] and report["unreported"]["1"][0] == 0
    assert [c["round"] for c in ClientState(str(tmp_path / "state1")).saved()["charges"]] == [0]

    # Execute: the node comes back; a 4-round job that needs both clients in every round, and the node is killed
    # again: the run stops after 2 aborted rounds (`max-aborted-rounds`)
    start_node(deployment, tmp_path, 1)
    charged = len(ClientState(str(tmp_path / "state0")).saved()["charges"])
    quorum = dict(job, **{"num-rounds": 4, "min-clients-per-round": 2, "max-aborted-rounds": 2})
    status = run_and_kill(deployment, tmp_path, "quorum", quorum, 1)

    # Assert: the run failed, saying why; nothing was published; client 0 paid round 0 only (round 1 was not
    # sent: its partner was offline), rounds 2 and 3 were never run
    assert status[0] == "finished:failed" and "quorum can no longer be reached" in status[1], status
    assert all(h["aborted"] for h in history(tmp_path, "quorum")) and len(history(tmp_path, "quorum")) == 2
    assert not {"adapter_model.safetensors", "README.md"} & set(os.listdir(tmp_path / "quorum"))
    run = json.loads((tmp_path / "quorum" / "privacy_report.json").read_text())["run"]
    assert run["status"] == "stopped" and sorted(run["rounds_lost"]) == ["0", "1", "2", "3"]
    assert len(ClientState(str(tmp_path / "state0")).saved()["charges"]) == charged + 1


def test_unregistered_supernode_is_refused(deployment, tmp_path):
    # Prepare / Execute: a SuperNode whose key was never registered with the SuperLink
    node = start_node(deployment, tmp_path, 0, register=False)

    # Assert: it exits with Flower's "failed to activate" error (the log says exit code 305; the process returns
    # 1), and never received work
    assert node.wait(timeout=120) != 0
    assert f"Exit Code: {UNREGISTERED_EXIT_CODE}" in deployment.log("node0")
    assert ClientState(str(tmp_path / "state0")).saved() is None
