"""Noise calibration: `calibrate_noise_multiplier` (RDP) against opacus' `get_noise_multiplier`, at the same target,
delta and tolerance (EPSILON_RTOL x target), for several sample rates and step counts. For each: the minimum of
--repeats wall times (every cache emptied before each), sigma, the epsilon that sigma reaches under opacus' own
`RDPAccountant` (the independent check: it must lie in [target x (1 - 1e-3), target]) and the number of accountant
evaluations (ours: on a subset of the orders / on every order). The load average is printed: the machine is shared.

    PYTHONPATH=. python benchmarks/calibration_speed.py
    PYTHONPATH=. python benchmarks/calibration_speed.py --no-opacus      # ours only (opacus' search takes seconds)
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

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


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta=delta)


def timed(fn, repeats: int, counter: dict) -> tuple[float, float, dict]:
    times = []
    for _ in range(repeats):
        accounting._rdp_at.cache_clear()
        accounting._rdp_per_step.cache_clear()
        counter.clear()
        start = time.perf_counter()
        sigma = fn()
        times.append(time.perf_counter() - start)
    return min(times), sigma, dict(counter)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--no-opacus", action="store_true", help="skip opacus' get_noise_multiplier")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")  # opacus' optimal-order warning, ours for sigma > 50
    counts = {}
    rdp_epsilon = accounting._rdp_epsilon

    def counted(history, delta, orders=accounting._ORDERS):
        key = "all" if orders is accounting._ORDERS else "subset"
        counts[key] = counts.get(key, 0) + 1
        return rdp_epsilon(history, delta, orders)

    accounting._rdp_epsilon = counted
    get_epsilon = RDPAccountant.get_epsilon

    def counted_get_epsilon(self, *a, **k):
        counts["all"] = counts.get("all", 0) + 1
        return get_epsilon(self, *a, **k)

    print(f"load average before: {os.getloadavg()}")
    print(
        "| q | steps | target | ours s | ours sigma | ours eps (opacus) | ours evals subset/all |"
        + ("" if args.no_opacus else " opacus s | opacus sigma | opacus eps | opacus evals |")
    )
    print("|---|---|---|---|---|---|---|" + ("" if args.no_opacus else "---|---|---|---|"))
    for q, steps, target in CASES:
        tol = accounting.EPSILON_RTOL * target
        t, sigma, c = timed(
            lambda: accounting.calibrate_noise_multiplier(
                target_epsilon=target, target_delta=args.delta, sample_rate=q, steps=steps
            ),
            args.repeats,
            counts,
        )
        reached = opacus_epsilon(sigma, q, steps, args.delta)
        evals = f"{c.get('subset', 0)}/{c.get('all', 0)}"
        row = f"| {q} | {steps} | {target} | {t:.3f} | {sigma:.5f} | {reached:.5f} | {evals} |"
        if not args.no_opacus:
            RDPAccountant.get_epsilon = counted_get_epsilon
            t, sigma, c = timed(
                lambda: get_noise_multiplier(
                    target_epsilon=target, target_delta=args.delta, sample_rate=q, steps=steps, epsilon_tolerance=tol
                ),
                args.repeats,
                counts,
            )
            RDPAccountant.get_epsilon = get_epsilon
            row += f" {t:.3f} | {sigma:.5f} | {opacus_epsilon(sigma, q, steps, args.delta):.5f} | {c.get('all', 0)} |"
        print(row, flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
