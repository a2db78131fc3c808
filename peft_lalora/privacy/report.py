"""The run-level fields of a privacy report, shared by the in-process trainer and the Flower server: what the
arguments say about the guarantee (secret or fixed noise, clipping groups), and the report of a non-private run.
The per-client epsilons come from the ledgers (`PrivacyLedger.report`, or what each Flower client reported)."""

from __future__ import annotations

import math

from .accounting import REPORT_UNIT
from .secure_random import GENERATOR

UNITS = {  # `privacy_unit` -> the report's and the card's words for what one DP step protects
    "example": REPORT_UNIT,
    "user": "all the examples of one user of one client",
}
FIXED_SEED_WARNING = (
    "`noise_seed` was fixed: the DP noise and the Poisson batches can be re-created by anyone who "
    "knows it, so this run has NO differential-privacy guarantee, whatever epsilon says."
)


def non_private_report() -> dict:
    """The report of a run trained without differential privacy (`dp=False`): epsilon is infinite."""
    return {
        "epsilon": math.inf,
        "delta": None,
        "noise_multiplier": 0.0,
        "per_sample_max_grad_norm": None,
        "accountant": None,
        "unit": REPORT_UNIT,
        "dp": False,
        "clients": [],
    }


def unit_fields(args) -> dict:
    """What the guarantee protects: `unit` (in words), `privacy_unit` ("example" or "user") and, for users, the
    `user_column` that names them (`privacy.users`)."""
    unit = args.privacy_unit
    fields = {"unit": UNITS[unit], "privacy_unit": unit}
    if unit == "user":
        fields["user_column"] = args.user_column
    return fields


def run_privacy_fields(args) -> dict:
    """The fields every DP report carries from `FederatedDPArguments`: the schedule and target, whether the noise
    was secret (with the warning when `noise_seed` fixed it), and the clipping groups with their joint
    per-example sensitivity."""
    fields = {
        "dp": True,
        **unit_fields(args),
        "target_epsilon": args.target_epsilon,
        "num_rounds": args.num_rounds,
        "local_steps": args.local_steps,
        "secret_randomness": args.noise_seed is None,
        "noise_generator": GENERATOR,
    }
    if args.noise_seed is not None:
        fields["noise_seed_warning"] = FIXED_SEED_WARNING
    if args.per_sample_head_max_grad_norm is not None:
        fields["clip_groups"] = {"lora": args.per_sample_max_grad_norm, "head": args.per_sample_head_max_grad_norm}
        fields["sensitivity"] = math.hypot(args.per_sample_max_grad_norm, args.per_sample_head_max_grad_norm)
    return fields


def with_client_level(report: dict, client_level, args) -> dict:
    """`report` with the client-level entry (`client_level`, unit "client") next to the per-client sample-level
    ones, and `guarantees`: which unit is protected, in one line each. Unchanged without client-level DP."""
    if client_level is None:
        return report
    if args.noise_seed is not None:
        client_level = {**client_level, "noise_seed_warning": FIXED_SEED_WARNING}
    sample = (
        f"sample-level ({report.get('unit')}): epsilon {report['epsilon']:.4g} per client, delta {report['delta']}"
        if report.get("dp")
        else "sample-level: NONE (`dp=False`): each client's local training is not private on its own"
    )
    client = f"client-level: epsilon {client_level['epsilon']:.4g}, delta {client_level['delta']:g}"
    return {**report, "client_level": client_level, "guarantees": [sample, client]}
