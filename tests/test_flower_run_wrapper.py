"""`python -m peft_lalora.flower.run`: Flower's `flwr run --stream` exits 0 for a run that failed (1 for a lost
SuperLink, as for a run that never started); the wrapper must exit non-zero with a message naming what happened.
Here a fake `flwr` (a small script, no Flower, no server) plays the CLI as measured with Flower 1.42: `run` prints
"Successfully started run N" and exits 0 (also for a run that failed; 1 where the SuperLink was lost),
`ls --format json` answers the run's status. A real SuperLink killed and
restarted mid-run is tests/test_flower_superlink_restart.py (`-m processes`).
"""

from __future__ import annotations

import configparser
import importlib
import json
import os
import subprocess
import sys
import time

import pytest

from peft_lalora.flower import run as wrapper

FAKE = """#!{python}
import json, os, sys
args = sys.argv[1:]
if args[0] == "run":
    print("Using SuperLink: lalora (127.0.0.1:9093)")
    if os.environ["FAKE_RUN"] == "refused":
        print("[code: 15] Invalid run configuration.")
        sys.exit(1)
    print("Successfully started run 4242")
    print("INFO : [ROUND 1/2]")
    out = os.environ.get("FAKE_WRITE")
    if out:
        name, body = os.environ["FAKE_FILE"], os.environ["FAKE_BODY"]
        with open(os.path.join(out, name), "w") as handle:
            handle.write(body)
    sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
if args[0] == "ls":
    assert args[2:] == ["--run-id", "4242", "--format", "json"], args
    if os.environ["FAKE_STATUS"] == "down":
        print("Connection to the SuperLink failed")
        sys.exit(1)
    status, details = os.environ["FAKE_STATUS"], os.environ.get("FAKE_DETAILS", "N/A")
    print(json.dumps({{"success": True, "runs": [{{"run-id": "4242", "status": status, "status-details": details}}]}}))
"""


@pytest.fixture
def fake_flwr(tmp_path, monkeypatch):
    path = tmp_path / "bin" / "flwr"
    path.parent.mkdir()
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{path.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_RUN", "ok")

    def configure(status, **env):
        monkeypatch.setenv("FAKE_STATUS", status)
        for key, value in env.items():
            monkeypatch.setenv(f"FAKE_{key}", value)

    return configure


def submit(tmp_path, capsys, *extra):
    code = wrapper.main(["app", "lalora", "-c", f'num-rounds=2 output-dir="{tmp_path}"', "--wait", "0", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def lost_rounds_report(status="failed", aggregated=(0,), lost=("1",)) -> str:
    run = {"status": status, "rounds_aggregated": list(aggregated), "rounds_lost": {r: "aborted" for r in lost}}
    return json.dumps({"epsilon": 7.35, "run": run})


def test_a_completed_run_exits_0(tmp_path, capsys, fake_flwr):
    fake_flwr(
        "finished:completed",
        WRITE=str(tmp_path),
        FILE="privacy_report.json",
        BODY=lost_rounds_report("completed", (0, 1), ()),
    )
    code, out, err = submit(tmp_path, capsys)
    assert code == 0, err
    assert "Successfully started run 4242" in out and "Run 4242 completed" in out and "rounds lost []" in out


def test_a_failed_run_exits_1_naming_the_cause_and_the_rounds_lost(tmp_path, capsys, fake_flwr):
    details = "FlowerRunError: The run failed during its rounds (a lost SuperLink)"
    fake_flwr(
        "finished:failed", DETAILS=details, WRITE=str(tmp_path), FILE="privacy_report.json", BODY=lost_rounds_report()
    )
    code, _, err = submit(tmp_path, capsys)
    assert code == 1
    assert f"Run 4242 ended `finished:failed` on the SuperLink: {details}" in err
    assert "rounds aggregated [0], rounds lost [1]" in err and "stays on their ledgers" in err


def test_a_superlink_restart_mid_run_exits_1_even_though_the_stream_exited_0(tmp_path, capsys, fake_flwr):
    # The restarted SuperLink still says `running`; the ServerApp died with it and left its history only
    history = json.dumps([{"round": 0, "aborted": False, "failed": {}, "survivors": [0, 1]}])
    fake_flwr("running", WRITE=str(tmp_path), FILE="flower_history.json", BODY=history, EXIT="1")
    code, _, err = submit(tmp_path, capsys)
    assert code == 1
    assert "still reports it `running`: the SuperLink probably restarted mid-run" in err
    assert err.rstrip().endswith("(`flwr run --stream` itself exited 1.)")
    assert "flower_history.json holds 1 round(s), aggregated [0]: rounds lost [1], and nothing was published" in err
    assert "state-dir`/ledger.json" in err


def test_a_superlink_lost_in_round_0_names_every_round_lost(tmp_path, capsys, fake_flwr):
    # The ServerApp writes an empty history before round 0 and died before finishing it
    fake_flwr("running", WRITE=str(tmp_path), FILE="flower_history.json", BODY="[]", EXIT="1")
    code, _, err = submit(tmp_path, capsys)
    assert code == 1
    assert "flower_history.json holds 0 round(s), aggregated []: rounds lost [0, 1], and nothing was published" in err


def test_an_unreachable_superlink_exits_1(tmp_path, capsys, fake_flwr):
    fake_flwr("down")
    code, _, err = submit(tmp_path, capsys)
    assert code == 1 and "its status cannot be read" in err and "Connection to the SuperLink failed" in err


def test_a_run_that_did_not_start_exits_2(tmp_path, capsys, fake_flwr, monkeypatch):
    fake_flwr("finished:completed")
    monkeypatch.setenv("FAKE_RUN", "refused")
    code, out, err = submit(tmp_path, capsys)
    assert code == 2 and "Invalid run configuration" in out and "started no run (exit code 1)" in err


def test_a_report_from_an_earlier_run_is_not_read(tmp_path, capsys, fake_flwr):
    (tmp_path / "privacy_report.json").write_text(lost_rounds_report("completed", (0, 1), ()))
    old = time.time() - 3600
    os.utime(tmp_path / "privacy_report.json", (old, old))
    fake_flwr("finished:failed", DETAILS="boom")
    code, _, err = submit(tmp_path, capsys)
    assert code == 1 and "privacy_report.json" not in err.split("stays on")[0]


def test_the_console_script_is_declared_and_python_m_still_runs():
    # `lalora-flower-run` (setup.cfg's console_scripts) names the same `main` as `python -m peft_lalora.flower.run`
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = configparser.ConfigParser()
    parser.read(os.path.join(root, "setup.cfg"))
    scripts = dict(
        (part.strip() for part in line.split("=", 1))
        for line in parser["options.entry_points"]["console_scripts"].splitlines()
        if line.strip()
    )
    module, _, name = scripts["lalora-flower-run"].partition(":")
    assert getattr(importlib.import_module(module), name) is wrapper.main
    assert module == "peft_lalora.flower.run" and scripts["lalora-private-trainer"] == "peft_lalora.owner.cli:main"
    shown = subprocess.run([sys.executable, "-m", "peft_lalora.flower.run", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "usage: python -m peft_lalora.flower.run" in shown.stdout, shown.stderr
