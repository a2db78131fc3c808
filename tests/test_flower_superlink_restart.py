"""The SuperLink restarted mid-run, over the real engine on 127.0.0.1 (TLS, SuperNode authentication, two
SuperNodes, the tests' tiny RoBERTa): the SuperLink keeps its state in a `--database` file, is killed (SIGKILL, by
PID, alone: its SuperExec and ServerApp are left to notice) once round 0 is aggregated and charged, and is restarted
on the same file and port. The job was submitted with `python -m peft_lalora.flower.run`: it must exit 1 with a
message naming what happened and the rounds lost; the clients' ledgers keep their round-0 charge; nothing is
published; the SuperNodes reconnect. Every process is stopped by PID, children included.

Measured: 2 min 49 s to 5 min 6 s (6 runs) on a shared 2-core machine at load average 2 to 8: 1.5 to 3 min until
round 0 is aggregated; the restarted SuperLink marks the run `finished:failed` ("No heartbeat received from the
task") 35 to 50 s after it starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: `pip install '.[flower]'` (CI installs it)")

from fed_helpers import toy_shards  # noqa: E402
from flower_deploy import Deployment, flwr_bin, make_node_key, write_toy_app  # noqa: E402

from peft_lalora.flower import ClientState  # noqa: E402

pytestmark = pytest.mark.processes  # starts servers or processes: `pytest -m processes` (CI runs it)

SIZES = (100, 120)
ROUNDS = 6
JOB = {
    "method": "lalora",
    "num-clients": 2,
    "clients-per-round": 2,
    "min-clients-per-round": 2,
    "num-rounds": ROUNDS,
    "local-steps": 2,
    "batch-size": 8,
    "learning-rate": 0.5,
    "per-sample-max-grad-norm": 1.0,
    "noise-multiplier": 1.0,
    "seed": 0,
    "output-dir": "out",
    "round-timeout": 600,
    "node-wait-timeout": 300,
}
DEADLINE = 900.0  # seconds for each wait below: generous, for a loaded 2-core machine (all of them poll)


def poll(check, what: str, deploy: Deployment, timeout: float = DEADLINE, every: float = 0.1):
    """`check()` until it returns something true (that is returned), or fail after `timeout` naming `what`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        deploy.record_children()
        found = check()
        if found:
            return found
        time.sleep(every)
    pytest.fail(f"waited {timeout:.0f} s for {what}; SuperLink log:\n{deploy.log('superlink')[-4000:]}")


def read_json(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):  # not written yet, or being rewritten
        return None


def read_json_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def charges(tmp_path, k: int) -> list:
    return (ClientState(str(tmp_path / f"state{k}")).saved() or {"charges": []})["charges"]


@pytest.fixture
def deployment(tmp_path):
    deploy = Deployment(str(tmp_path / "deploy"))
    toy_shards(SIZES, tmp_path / "data")
    try:
        deploy.start_superlink(database=str(tmp_path / "deploy" / "superlink.db"))
        for k in range(2):
            key, public = make_node_key(deploy.root, f"node{k}")
            deploy.register(public)
            deploy.start_supernode(
                f"node{k}",
                key,
                {
                    "partition-id": k,
                    "data-path": str(tmp_path / "data" / str(k)),
                    "state-dir": str(tmp_path / f"state{k}"),
                },
            )
        yield deploy
    finally:
        deploy.close()
        assert not deploy.procs and not deploy.left


def test_superlink_restarted_mid_run(deployment, tmp_path):
    started = time.time()
    out = tmp_path / "out"
    app = write_toy_app(str(tmp_path / "app"), JOB)
    wrapper_log = tmp_path / "wrapper.log"

    # Execute: submit a 6-round job through the wrapper, as the operator does
    with open(wrapper_log, "wb") as log:
        wrapper = subprocess.Popen(
            [sys.executable, "-m", "peft_lalora.flower.run", app, "local", "--flwr", flwr_bin(), "--wait", "900"]
            + ["-c", f'output-dir="{out}" num-rounds={ROUNDS}'],
            env=deployment.env,
            cwd=deployment.root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # ... wait until round 0 is aggregated (flower_history.json) and both clients charged it, then SIGKILL the
        # SuperLink alone (its ServerApp is left to notice, as after a real `kill -9`)
        def round_0_done():
            if wrapper.poll() is not None:
                pytest.fail("the wrapper exited before round 0 was aggregated:\n" + wrapper_log.read_text())
            history = read_json(out / "flower_history.json")
            return history and all(any(c["round"] == 0 for c in charges(tmp_path, k)) for k in range(2))

        poll(round_0_done, "round 0 to be aggregated and charged", deployment)
        deployment.kill("superlink")
        killed = time.time()
        port = deployment.port
        # ... Flower's SuperExec and the ServerApp exit on their own once their parent is gone (nothing published)
        assert not deployment.wait_left(120), "the SuperLink's children outlived it"
        history = read_json(out / "flower_history.json")
        at_kill = [charges(tmp_path, k) for k in range(2)]

        # ... restart the SuperLink on the same state (database file) and port
        deployment.start_superlink(database=str(tmp_path / "deploy" / "superlink.db"), port=port)
        restarted = time.time()
        code = wrapper.wait(timeout=DEADLINE + 300)
        ended = time.time()
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()
    text = wrapper_log.read_text(errors="replace")
    timings = (
        f"kill at {killed - started:.0f} s, restart at {restarted - started:.0f} s, end at {ended - started:.0f} s"
    )
    print(timings)
    print(text[-3000:])

    # Assert: the wrapper exits 1, naming what happened (the run failed on the SuperLink, the lost heartbeat of the
    # ServerApp that died with it) and the rounds lost: those after the last aggregated one
    aggregated = [h["round"] for h in history if not h.get("aborted")]
    lost = [r for r in range(ROUNDS) if r not in aggregated]
    assert code == 1, f"{timings}\n{text[-5000:]}"
    message = text[text.index("peft_lalora.flower.run: ") :]
    assert "ended `finished:failed` on the SuperLink" in message, message
    assert f"aggregated {aggregated}: rounds lost {lost}, and nothing was published" in message, message
    assert "stays on their ledgers" in message, message
    assert "(`flwr run --stream` itself exited 1.)" in message, message  # Flower 1.42: the stream's lost connection
    assert aggregated and aggregated == list(range(len(aggregated))) and lost

    # Assert: the clients' ledgers kept what they charged (round 0 at least; a round in flight may be charged too)
    final = [charges(tmp_path, k) for k in range(2)]
    for k in range(2):
        assert final[k][: len(at_kill[k])] == at_kill[k], (k, at_kill[k], final[k])
        rounds = [c["round"] for c in final[k]]
        assert 0 in rounds and set(rounds) <= set(aggregated) | {max(aggregated) + 1}, rounds
        assert len({c["run_id"] for c in final[k]}) == 1

    # Assert: nothing was published: no adapter, no card, no report claiming rounds that did not happen
    assert not {"adapter_model.safetensors", "README.md", "privacy_report.json"} & set(os.listdir(out))
    assert read_json(out / "flower_history.json") == history

    # Assert: the SuperNodes survived the restart and are back online with the restarted SuperLink
    assert all(deployment.procs[f"node{k}"].poll() is None for k in range(2))

    def both_online():
        listed = read_json_text(deployment.flwr("supernode", "ls", "local", "--format", "json").stdout) or {}
        return sum(n.get("status") == "online" for n in listed.get("nodes", [])) == 2

    poll(both_online, "both SuperNodes online again", deployment, timeout=300, every=2)
