"""Noise calibration cost: `calibrate_noise_multiplier` (opacus' `get_noise_multiplier` per client on the Pareto
front of (q, steps), then every client checked) for single clients and for the default recipe job's schedule.

For each case: the minimum over --repeats of the wall and the CPU time (every cache emptied before each), sigma, the
largest epsilon over the clients at that sigma under opacus' own accountant (the independent check: it must lie in
[target x (1 - 1e-3), target]) and the number of opacus epsilon evaluations. The load average is printed: the
machine is shared, so the CPU time is the figure to compare.

The default job (recipes/fed_roberta.py): 10 clients (the "movie" split of the Rotten Tomatoes training snippets:
1174 to 1176 examples each), batch 32, 4 clients per round, 16 rounds, 8 local steps, seed 42, target epsilon 8,
delta 1e-5; its public schedule gives the clients 24 to 80 steps.

    PYTHONPATH=. python benchmarks/calibration_speed.py
    PYTHONPATH=. python benchmarks/calibration_speed.py --accountant prv --only-job
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

from opacus.accountants import PRVAccountant, RDPAccountant

from peft_lalora.federated.seeding import scheduled_steps
from peft_lalora.privacy import accounting

CASES = [
    (0.01, 64, 8.0),
    (0.1, 64, 8.0),
    (0.5, 64, 8.0),
    (1.0, 64, 8.0),
    (0.5, 1, 8.0),
    (0.5, 1000, 3.0),
    (0.01, 1000, 1.0),
    (0.5, 1000, 1.0),
]
JOB_SIZES = [1174, 1174, 1174, 1176, 1176, 1176, 1176, 1176, 1175, 1175]


def default_job() -> tuple[list, list, float]:
    steps = scheduled_steps(seed=42, rounds=16, num_clients=10, clients_per_round=4, local_steps=8)
    return [32 / n for n in JOB_SIZES], [steps[k] for k in range(10)], 8.0


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta=delta)


def counting(cls, counts: dict):
    real = cls.get_epsilon

    def get_epsilon(self, *a, **k):
        counts["n"] = counts.get("n", 0) + 1
        return real(self, *a, **k)

    cls.get_epsilon = get_epsilon


def run(q, steps, target, args, counts) -> str:
    walls, cpus = [], []
    for _ in range(args.repeats):
        accounting._rdp_per_step.cache_clear()
        counts.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        sigma = accounting.calibrate_noise_multiplier(
            target_epsilon=target, target_delta=args.delta, sample_rate=q, steps=steps, accountant=args.accountant
        )
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    evals = counts.get("n", 0)
    clients = list(zip(q, steps)) if isinstance(q, list) else [(q, steps)]
    reached = max(opacus_epsilon(sigma, q_k, n_k, args.delta, args.accountant) for q_k, n_k in clients if n_k)
    q_txt = f"{min(q):.4f}..{max(q):.4f}" if isinstance(q, list) else q
    n_txt = f"{min(steps)}..{max(steps)}" if isinstance(steps, list) else steps
    return f"| {q_txt} | {n_txt} | {target} | {min(walls):.3f} | {min(cpus):.3f} | {sigma:.5f} | {reached:.5f} | {evals} |"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", choices=accounting.ACCOUNTANTS, default="rdp")
    p.add_argument("--only-job", action="store_true", help="only the default job's schedule")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")  # opacus' optimal-order warning, ours for sigma > 50
    counts = {}
    counting(RDPAccountant if args.accountant == "rdp" else PRVAccountant, counts)  # PRV's domain calls RDP's
    print(f"accountant {args.accountant}; load average before: {os.getloadavg()}")
    print("| q | steps | target | wall s | CPU s | sigma | max eps (opacus) | opacus evals |")
    print("|---|---|---|---|---|---|---|---|")
    for case in [default_job()] + ([] if args.only_job else CASES):
        print(run(*case, args, counts), flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
