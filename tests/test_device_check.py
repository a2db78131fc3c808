"""benchmarks/device_check.sh --dry-run: the GPU machine's script runs every part on CPU with tiny sizes and
writes its summary (the plumbing is checked here so that the one run on a lent GPU does not fail on it)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.processes  # starts servers or processes: `pytest -m processes` (CI runs it)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = (
    "env",
    "install",
    "imports",
    "gpu_tests",
    "dp_overhead_minilm",
    "dp_overhead_roberta",
    "llm_memory",
    "pu_faithful",
)
FILES = (
    "summary.txt",
    "env.txt",
    "gpu_tests.txt",
    "gpu_tests.xml",
    "benchmarks.txt",
    "dp_overhead.json",
    "llm_memory.json",
    "privacy_utility_faithful.json",
)


def test_dry_run_writes_a_summary_listing_every_part(tmp_path):
    # Execute
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Assert: every part ran (the wheels' install is skipped where no .whl/ was carried) and at most 8 files came out
    summary = (tmp_path / "summary.txt").read_text()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "mode: dry-run" in summary
    rows = {line.split()[0]: line for line in summary.splitlines() if line.split()[:1] and line.split()[0] in PARTS}
    assert set(rows) == set(PARTS), summary
    for part, row in rows.items():
        assert " ok " in row or (part == "install" and "skipped: no .whl" in row), row
    assert "skipped" in summary.split("gpu_tests:")[-1].splitlines()[0]  # no CUDA here: the GPU tests skip
    assert "ratio" in summary  # both overhead tables made it into the summary
    assert "| 16 | B |" in summary.split("causal-LM step table")[-1]  # the causal-LM table too
    faithful = json.loads((tmp_path / "privacy_utility_faithful.json").read_text())
    assert {r["method"] for r in faithful["runs"]} == {"lalora"}  # the faithful preset's run (quick sizes)
    assert faithful["settings"]["optimizer"].startswith("adamw") and faithful["settings"]["lora_alpha"] == 8
    assert summary.count("test=") == len([r for r in faithful["runs"] if not r.get("reused_tuning_run")])
    assert sorted(os.listdir(tmp_path)) == sorted(FILES)
