"""Under `accelerate launch --num_processes 2` each process runs half of every round's clients and the deltas
are summed across processes: the final adapter equals the one-process run (atol 1e-6: only the order of the
float32 sums differs)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from flower_deploy import free_port
from safetensors.torch import load_file

pytestmark = pytest.mark.processes  # starts servers or processes: `pytest -m processes` (CI runs it)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def launch(num_processes: int, output_dir, *extra) -> None:
    env = dict(
        os.environ,
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'tests')}",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    # `--cpu` would run a single process: `--multi_gpu` is accelerate's torchrun launcher, and the script's
    # `use_cpu=True` turns it into a multi-CPU (gloo) run
    mode = ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    cmd = [
        ACCELERATE,
        "launch",
        *mode,
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),  # a free port, not a fixed one: other runs on the machine may hold 29501
        os.path.join(ROOT, "tests", "accelerate_fed_run.py"),
        str(output_dir),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="the accelerate CLI is installed with accelerate")
def test_two_processes_equal_one_process(tmp_path):
    launch(1, tmp_path / "one")
    launch(2, tmp_path / "two")
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6)
    # the two processes really split every round's clients between them
    shares = [json.loads((tmp_path / "two" / f"clients-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(share["world_size"] == 2 for share in shares)
    single = json.loads((tmp_path / "one" / "clients-0.json").read_text())["clients"]
    for round_idx, everyone in enumerate(single):
        first, second = shares[0]["clients"][round_idx], shares[1]["clients"][round_idx]
        assert first and second and not set(first) & set(second) and sorted(first + second) == everyone
    report_one = (tmp_path / "one" / "privacy_report.json").read_text()
    report_two = (tmp_path / "two" / "privacy_report.json").read_text()
    assert report_one == report_two


@pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="the accelerate CLI is installed with accelerate")
def test_two_processes_share_one_secret_noise_root(tmp_path):
    # Both ranks must draw their clients' noise from rank 0's secret root, or a resume would not be identical
    launch(2, tmp_path / "a", "secret")
    launch(2, tmp_path / "b", "secret")
    roots = {
        run: [json.loads((tmp_path / run / f"clients-{rank}.json").read_text())["noise_root"] for rank in (0, 1)]
        for run in ("a", "b")
    }
    assert roots["a"][0] == roots["a"][1] and roots["b"][0] == roots["b"][1]
    assert roots["a"][0] != roots["b"][0]  # and every run draws a new one
