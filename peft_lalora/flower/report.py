"""The privacy report of a Flower run, from what the clients reported: each client accounts for itself (its
own sigma, delta and ledger on its own disk), so the report lists every client and the maximum epsilon."""

from __future__ import annotations

from ..privacy.accounting import REPORT_UNIT
from ..privacy.report import non_private_report, run_privacy_fields

NOTE = (
    "Each client's epsilon is its own ledger's (kept on its own disk), over every local step ever charged to "
    "its data, earlier runs included. A client in `unreported` was sent those rounds and did not report back "
    "(killed, unreachable, or its update failed): it may have charged them after its last report, and its "
    "ledger file is the authority."
)


def privacy_report(strategy) -> dict:
    """Epsilon per client (as last reported) and the maximum, the clients' delta, sigma, C, rates and steps."""
    args = strategy.args
    if not args.dp:
        return {"engine": "flower", **non_private_report()}
    clients = [
        {
            "client": pid,
            "epsilon": r["epsilon"],
            "delta": r["delta"],
            "noise_multiplier": r["noise-multiplier"],
            "sample_rate": r["sample-rate"],
            "steps": r["steps"],
            "budget": r.get("budget"),
            "last_round": r["last_round"],
            "secret_randomness": r["secret-randomness"],
            "sigma_calibration": r.get("sigma-calibration"),
            **({"users": r["users"]} if r.get("users") is not None else {}),
        }
        for pid, r in sorted(strategy.clients.items())
    ]
    report = {
        "engine": "flower",
        "dp": True,
        "unit": REPORT_UNIT,
        "epsilon": max((c["epsilon"] for c in clients), default=None),
        "delta": max((c["delta"] for c in clients), default=None),
        "noise_multiplier": min((c["noise_multiplier"] for c in clients), default=None),
        "per_sample_max_grad_norm": args.per_sample_max_grad_norm,
        "accountant": args.accountant,
        **run_privacy_fields(args),
        "sigma_calibration": f"each client for itself: {args.sigma_calibration}",
        "clients": clients,
        "refused": list(strategy.refused),
        "unreported": {str(k): v for k, v in sorted(strategy.unreported.items())},
        "note": NOTE,
    }
    return report
