"""A DP checkpoint's ledger must charge exactly the rounds the checkpoint says were run: a ledger that was
removed, emptied or edited would resume with the epsilon already spent forgotten."""

from __future__ import annotations

from ..errors import CheckpointMismatchError, ConfigError
from ..privacy.accounting import PrivacyLedger
from .seeding import run_schedule

_FIX = "The checkpoint was altered or is incomplete: start a fresh `output_dir`."


def checked_ledger(state: dict, directory: str, args, federation) -> PrivacyLedger:
    """The ledger of checkpoint `state`, or `CheckpointMismatchError` when it is missing, unreadable, or does not
    charge each client exactly its scheduled steps (`args`' public schedule, after `federation.prior_steps`, an
    earlier run's composed steps) with the run's sigma, delta (`federation`: the trainer's) and accountant."""
    if not state.get("ledger"):
        raise CheckpointMismatchError(
            f"The DP checkpoint {directory!r} holds no privacy ledger, so the epsilon "
            f"already spent would be lost. {_FIX}"
        )
    try:
        ledger = PrivacyLedger.from_state_dict(state["ledger"])
    except ConfigError as exc:
        raise CheckpointMismatchError(
            f"The DP checkpoint {directory!r} holds an unreadable ledger ({exc}). {_FIX}"
        ) from exc
    rounds = int(state["round"]) + 1
    expected = run_schedule(args, rounds)
    if set(ledger.clients) != set(expected):
        raise CheckpointMismatchError(
            f"The DP checkpoint {directory!r} has a ledger for clients "
            f"{sorted(ledger.clients)[:10]}, not the run's {args.num_clients}. {_FIX}"
        )
    if federation.prior_steps:
        expected = {c: n + federation.prior_steps.get(c, 0) for c, n in expected.items()}
    wrong = {c: (ledger.steps(c), n) for c, n in expected.items() if ledger.steps(c) != n}
    if wrong:
        shown = dict(list(wrong.items())[:5])
        raise CheckpointMismatchError(
            f"The DP checkpoint {directory!r} has a ledger inconsistent with its {rounds} "
            f"completed round(s): client: (charged, scheduled) steps {shown}. {_FIX}"
        )
    run = (federation.noise_multiplier, federation.delta, args.accountant)
    if (ledger.noise_multiplier, ledger.delta, ledger.accountant) != run:
        raise CheckpointMismatchError(
            f"The DP checkpoint {directory!r} has a ledger with sigma={ledger.noise_multiplier}, "
            f"delta={ledger.delta}, accountant={ledger.accountant!r}, not the run's {run[0]}, {run[1]}, {run[2]!r}. "
            f"{_FIX}"
        )
    return ledger
