"""The privacy report of a Flower run, from what the clients reported: each client accounts for itself (its
own sigma, delta and ledger on its own disk), so the report lists every client and the maximum epsilon."""

from __future__ import annotations

from ..privacy.accounting import REPORT_UNIT, compute_epsilon
from ..privacy.report import PrivacyReport, build_report, non_private_report, run_privacy_fields, with_client_level

NOTE = (
    "Each client's epsilon is its own ledger's (kept on its own disk), over every local step ever charged to "
    "its data, earlier runs included. A client in `unreported` was sent those rounds and did not report back "
    "(killed, unreachable, or its update failed): it may have charged them after its last report, and its "
    "ledger file is the authority."
)

PARTICIPATION_NOTE = (
    "Client-level DP: which clients were sampled in which round is secret, so each client's epsilon here is the "
    "one of taking part in every round of this run (its reported steps plus `local_steps` for each round it did "
    "not report, at its sigma and sample rate). It bounds its ledger when the ledger holds this run only; "
    "otherwise the ledger file on the client's disk is the authority."
)


def privacy_report(strategy, run: dict) -> PrivacyReport:
    """Epsilon per client (as last reported) and the maximum, the clients' delta, sigma, C, rates and steps, and
    `run` (how the rounds went: `outcome.outcome`)."""
    return build_report({**_report_fields(strategy), "run": run})


def _report_fields(strategy) -> dict:
    args = strategy.args
    client_level = strategy.policy.client_level_report(len(strategy.history))
    if not args.dp:
        return with_client_level({"engine": "flower", **non_private_report()}, client_level, args)
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
    if client_level is not None:
        hide_participation(report, strategy)
    return with_client_level(report, client_level, args)


def hide_participation(report: dict, strategy) -> None:
    """Under client-level DP the clients' Poisson sample is secret, but each client's ledger counts the rounds it
    was sampled in: the published entries give instead the epsilon of `PARTICIPATION_NOTE`, and no `last_round`."""
    args, released = strategy.args, len(strategy.history)
    for entry in report["clients"]:
        taken = sum(1 for h in strategy.history if entry["client"] in h["survivors"])
        entry["steps"] += args.local_steps * (released - taken)
        entry["epsilon"] = compute_epsilon(
            noise_multiplier=entry["noise_multiplier"],
            sample_rate=entry["sample_rate"],
            steps=entry["steps"],
            delta=entry["delta"],
            accountant=args.accountant,
        )
        entry.pop("last_round")
    refused = [{k: v for k, v in r.items() if k != "round"} for r in report["refused"]]
    epsilon = max((c["epsilon"] for c in report["clients"]), default=None)
    report.update(epsilon=epsilon, unreported={}, refused=refused, note=PARTICIPATION_NOTE)
