"""The privacy report of a Flower run, from what the clients reported: each client accounts for itself (its
own sigma, delta and ledger on its own disk), so the report lists every client and the maximum epsilon."""

from __future__ import annotations

import math

from ..privacy.accounting import REPORT_UNIT
from ..trainer import FIXED_SEED_WARNING

NOTE = ("Each client's epsilon is its own ledger's (kept on its own disk), over every local step ever charged to "
        "its data, earlier runs included. A client in `unreported` was sent those rounds and did not report back "
        "(killed, unreachable, or its update failed): it may have charged them after its last report, and its "
        "ledger file is the authority.")


def privacy_report(strategy) -> dict:
    """Epsilon per client (as last reported) and the maximum, the clients' delta, sigma, C, rates and steps."""
    args = strategy.args
    if not args.dp:
        return {"engine": "flower", "dp": False, "epsilon": math.inf, "delta": None, "noise_multiplier": 0.0,
                "per_sample_max_grad_norm": None, "accountant": None, "unit": REPORT_UNIT, "clients": []}
    clients = [{"client": pid, "epsilon": r["epsilon"], "delta": r["delta"], "noise_multiplier": r["noise-multiplier"],
                "sample_rate": r["sample-rate"], "steps": r["steps"], "budget": r.get("budget"),
                "last_round": r["last_round"], "secret_randomness": r["secret-randomness"],
                "sigma_calibration": r.get("sigma-calibration")}
               for pid, r in sorted(strategy.clients.items())]
    report = {
        "engine": "flower", "dp": True, "unit": REPORT_UNIT,
        "epsilon": max((c["epsilon"] for c in clients), default=None),
        "delta": max((c["delta"] for c in clients), default=None),
        "noise_multiplier": min((c["noise_multiplier"] for c in clients), default=None),
        "per_sample_max_grad_norm": args.per_sample_max_grad_norm, "accountant": args.accountant,
        "target_epsilon": args.target_epsilon, "num_rounds": args.num_rounds, "local_steps": args.local_steps,
        "sigma_calibration": f"each client for itself: {args.sigma_calibration}",
        "secret_randomness": args.noise_seed is None, "clients": clients,
        "refused": list(strategy.refused), "unreported": {str(k): v for k, v in sorted(strategy.unreported.items())},
        "note": NOTE,
    }
    if args.per_sample_head_max_grad_norm is not None:
        report["clip_groups"] = {"lora": args.per_sample_max_grad_norm, "head": args.per_sample_head_max_grad_norm}
        report["sensitivity"] = math.hypot(args.per_sample_max_grad_norm, args.per_sample_head_max_grad_norm)
    if args.noise_seed is not None:
        report["noise_seed_warning"] = FIXED_SEED_WARNING
    return report
