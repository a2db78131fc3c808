"""A DP checkpoint's ledger must charge exactly the rounds the checkpoint says were run: a ledger that was
removed, emptied or edited would resume with the epsilon already spent forgotten."""

from __future__ import annotations

from ..errors import CheckpointMismatchError, ConfigError
from ..privacy.accounting import PrivacyLedger
from .seeding import scheduled_steps

_FIX = "The checkpoint was altered or is incomplete: start a fresh `output_dir`."


def checked_ledger(
    state: dict,
    directory: str,
    *,
    seed: int,
    num_clients: int,
    clients_per_round: int,
    local_steps: int,
    noise_multiplier: float,
    delta: float,
    accountant: str,
    prior_steps: dict | None = None,
) -> PrivacyLedger:
    """The ledger of checkpoint `state`, or `CheckpointMismatchError` when it is missing, unreadable, or does not
    charge each client exactly its scheduled steps (after `prior_steps`, an earlier run's composed steps) with the
    run's sigma, delta and accountant."""
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
    expected = scheduled_steps(
        seed=seed, rounds=rounds, num_clients=num_clients, clients_per_round=clients_per_round, local_steps=local_steps
    )
    if set(ledger.clients) != set(expected):
        raise CheckpointMismatchError(
            f"The DP checkpoint {directory!r} has a ledger for clients "
            f"{sorted(ledger.clients)[:10]}, not the run's {num_clients}. {_FIX}"
        )
    if prior_steps:
        expected = {c: n + prior_steps.get(c, 0) for c, n in expected.items()}
    wrong = {c: (ledger.steps(c), n) for c, n in expected.items() if ledger.steps(c) != n}
    if wrong:
        shown = dict(list(wrong.items())[:5])
        raise CheckpointMismatchError(
            f"The DP checkpoint {directory!r} has a ledger inconsistent with its {rounds} "
            f"completed round(s): client: (charged, scheduled) steps {shown}. {_FIX}"
        )
    if (ledger.noise_multiplier, ledger.delta, ledger.accountant) != (noise_multiplier, delta, accountant):
        raise CheckpointMismatchError(
            f"The DP checkpoint {directory!r} has a ledger with sigma={ledger.noise_multiplier}, "
            f"delta={ledger.delta}, accountant={ledger.accountant!r}, not the run's {noise_multiplier}, {delta}, "
            f"{accountant!r}. {_FIX}"
        )
    return ledger
