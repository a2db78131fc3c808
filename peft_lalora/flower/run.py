"""`python -m peft_lalora.flower.run APP CONNECTION -c '...'` (installed: `lalora-flower-run`): submit a run as
`flwr run APP CONNECTION --stream` does, then exit non-zero unless the run really completed.

Flower 1.42's `flwr run --stream` exits 0 for a run that failed or stopped, and 1 (as for a run that never
started) when the SuperLink is lost mid-run; its CLI cannot be changed from here. So this asks the SuperLink
afterwards (`flwr ls CONNECTION --run-id N --format json`: the CLI's own answer, no private API) and, where the
run's `output-dir` is readable here, reads the ServerApp's `privacy_report.json` (its `run` entry) or, when the
ServerApp died before writing it, `flower_history.json`; only files written after this command started count.
Exit codes: 0 the run completed; 1 it failed, stopped, or its end is unknown (the message names what happened and
the rounds lost); 2 `flwr run` did not start a run. Details and the measured SuperLink restart: docs/flower.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

STARTED = re.compile(r"Successfully started run (\d+)")
OUTPUT_DIR = re.compile(r"""output-dir\s*=\s*["']([^"']+)["']""")
NUM_ROUNDS = re.compile(r"(?:^|\s)num-rounds\s*=\s*(\d+)")
PROG = "lalora-flower-run"  # the console script (setup.cfg); `python -m peft_lalora.flower.run` runs the same `main`


def submit(flwr: str, app: str, connection: str, extra: list) -> tuple[int, str | None]:
    """Run `flwr run APP CONNECTION --stream ...`, echoing its output; (its exit code, the run id it printed)."""
    run_id = None
    with subprocess.Popen(
        [flwr, "run", app, connection, "--stream", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            match = STARTED.search(line)
            if match and run_id is None:
                run_id = match.group(1)
    return proc.returncode, run_id


def run_status(flwr: str, connection: str, run_id: str, wait_s: float, poll_s: float = 5.0) -> tuple[dict, str]:
    """The run's entry in `flwr ls ... --format json` once it is finished (or the last seen, or {} and why not)."""
    deadline, last, why = time.monotonic() + wait_s, {}, ""
    while True:
        done = subprocess.run(
            [flwr, "ls", connection, "--run-id", run_id, "--format", "json"], capture_output=True, text=True
        )
        try:
            runs = json.loads(done.stdout).get("runs") or []
            last = next((r for r in runs if str(r.get("run-id")) == run_id), last)
            why = "" if runs else f"the SuperLink does not know run {run_id}"
        except (json.JSONDecodeError, AttributeError):
            why = f"`flwr ls` answered (exit code {done.returncode}): {(done.stdout + done.stderr).strip()[-300:]!r}"
        if str(last.get("status", "")).startswith("finished") or time.monotonic() >= deadline:
            return last, why
        time.sleep(poll_s)


def _fresh_json(folder: str | None, name: str, since: float):
    path = os.path.join(folder, name) if folder else None
    if path and os.path.isfile(path) and os.path.getmtime(path) >= since:
        with open(path) as handle:
            return json.load(handle)
    return None


def server_outcome(output_dir: str | None, since: float, num_rounds: int | None = None) -> str:
    """What the ServerApp's files in `output_dir` say about the rounds (empty if they are not readable here)."""
    report = _fresh_json(output_dir, "privacy_report.json", since)
    if report and isinstance(report.get("run"), dict):
        run = report["run"]
        lost = sorted(int(r) for r in run.get("rounds_lost", {}))
        return (
            f"The ServerApp's report ({output_dir}/privacy_report.json): status {run.get('status')!r}, rounds "
            f"aggregated {run.get('rounds_aggregated')}, rounds lost {lost}."
        )
    history = _fresh_json(output_dir, "flower_history.json", since)
    if isinstance(history, list):
        done = [h.get("round") for h in history if not h.get("aborted")]
        lost = [h.get("round") for h in history if h.get("aborted")] + list(range(len(history), num_rounds or 0))
        later = f"rounds lost {lost}" if num_rounds else "every later round was lost"
        return (
            f"The ServerApp wrote no report (it died with the run); {output_dir}/flower_history.json holds "
            f"{len(history)} round(s), aggregated {done}: {later}, and nothing was published."
        )
    return ""


def verdict(run_id: str, entry: dict, why: str, outcome: str, wait_s: float) -> tuple[int, str]:
    status, details = str(entry.get("status", "")), entry.get("status-details", "N/A")
    charged = (
        "What the clients charged stays on their ledgers (see `unreported` in privacy_report.json)."
        if "privacy_report.json" in outcome
        else "What the clients charged stays on their ledgers (each client's `state-dir`/ledger.json; a client "
        "may have charged the round in flight)."
    )
    report_completed = not outcome or "status 'completed'" in outcome  # no report readable here: the SuperLink's word
    if status == "finished:completed" and report_completed:
        return 0, f"Run {run_id} completed. {outcome}".strip()
    if status.startswith("finished"):
        text = f"Run {run_id} ended `{status}` on the SuperLink: {str(details).rstrip('.')}."
    elif status:
        text = (
            f"The log stream of run {run_id} ended, but after {wait_s:.0f} s the SuperLink still reports it "
            f'`{status}`: the SuperLink probably restarted mid-run (Flower then ends the stream with "Connection '
            'to the SuperLink is unavailable"). Check `flwr ls`, or wait for the SuperLink to mark it '
            "`finished:failed`."
        )
    else:
        text = f"The log stream of run {run_id} ended and its status cannot be read: {why or 'no answer'}."
    return 1, " ".join(part for part in (text, outcome, charged) if part)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG if os.path.basename(sys.argv[0]) == PROG else "python -m peft_lalora.flower.run",
        description="`flwr run APP CONNECTION --stream` that exits non-zero unless the run completed.",
    )
    parser.add_argument("app", help="the Flower app folder (as for `flwr run`)")
    parser.add_argument("connection", help="the SuperLink connection's name in $FLWR_HOME/config.toml")
    parser.add_argument("--flwr", default="flwr", help="the `flwr` executable (default: the one on PATH)")
    parser.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the run to be finished")
    parser.add_argument("--output-dir", help="the run's output-dir as seen here (default: from `-c`, if readable)")
    args, extra = parser.parse_known_args(argv)
    flwr, since = shutil.which(args.flwr), time.time() - 1.0
    if flwr is None:
        raise SystemExit(f"peft_lalora.flower.run: `--flwr` {args.flwr!r} is not an executable on PATH.")
    code, run_id = submit(flwr, args.app, args.connection, [a for a in extra if a != "--stream"])
    if run_id is None:
        sys.stderr.write(f"peft_lalora.flower.run: `flwr run` started no run (exit code {code}); see its output.\n")
        return 2
    entry, why = run_status(flwr, args.connection, run_id, args.wait)
    found = OUTPUT_DIR.search(" ".join(extra))
    output_dir = args.output_dir or (found.group(1) if found else None)
    rounds = NUM_ROUNDS.search(" ".join(extra))
    outcome = server_outcome(output_dir, since, int(rounds.group(1)) if rounds else None)
    status, text = verdict(run_id, entry, why, outcome, args.wait)
    if code and status:  # e.g. the log stream cut by a lost SuperLink ("Connection to the SuperLink is unavailable")
        text += f" (`flwr run --stream` itself exited {code}.)"
    (sys.stdout if status == 0 else sys.stderr).write(f"peft_lalora.flower.run: {text}\n")
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
