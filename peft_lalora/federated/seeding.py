"""Randomness of a federated run: every draw derives from (seed, what, round, client).

Two roots: the public `seed` (partition, client selection, initialisation: what may be known) and the private
root of the DP noise and the Poisson batches, drawn from the operating system's entropy for each run
(`secret_seed`) and kept only in the private checkpoint. The noise and the batches come from ChaCha20 streams
keyed by the private root (`privacy.secure_random.SecureRandom`); torch's generators, which keep 32 (CPU) or
64 (CUDA) bits of a seed, only ever draw dropout and public things. Nothing random is carried from one client or
round to the next, so a client's local round gives the same result whichever process runs it and after any resume.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from the run seed and any keys (e.g. "noise", round, client)."""
    text = ":".join(str(k) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def secret_seed() -> str:
    """A fresh 256-bit private root from the operating system's entropy (`secrets`): no public setting, and no
    earlier run, lets anyone re-create the noise and the batches derived from it."""
    return secrets.token_hex(32)


@contextmanager
def global_rng(seed: int, *keys, device="cpu") -> Iterator[None]:
    """Seed torch's global generator that dropout on `device` draws from (dropout takes no generator) for the
    block, and give the caller back its CPU generator and those of the CUDA devices in use on exit.

    On CPU only the CPU generator is seeded: `torch.manual_seed` also queues a seed for every accelerator kind,
    recording a stack trace for each, which costs more than a local step's other bookkeeping together. On other
    devices `torch.manual_seed` seeds them all; other backends (MPS, XPU), and CUDA when not yet initialised,
    keep the block's seed.

    Never on the path of the DP noise or the Poisson batches (see above). Dropout's masks are data-independent and
    not part of the mechanism; `seed` here is hashed (`derive_seed`), so it gives nothing of the root away.
    tests/test_unguessable_noise.py checks that no seed handed to torch re-creates any run of the released noise."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    value = derive_seed(seed, *keys)
    with torch.random.fork_rng(devices=cuda):
        if torch.device(device).type == "cpu":
            torch.default_generator.manual_seed(value)
        else:
            torch.manual_seed(value)
        yield


def select_clients(seed: int, round_idx: int, num_clients: int, clients_per_round: int) -> list:
    """The round's participants: `clients_per_round` distinct clients, uniformly at random, sorted."""
    rng = np.random.default_rng(derive_seed(seed, "select", round_idx))
    return sorted(int(c) for c in rng.choice(num_clients, size=clients_per_round, replace=False))


def scheduled_steps(*, seed: int, rounds: int, num_clients: int, clients_per_round: int, local_steps: int) -> dict:
    """Local steps each client takes in rounds 0..rounds-1 under the public participation schedule (known before
    training: it depends on the public seed only, never on the data)."""
    steps = dict.fromkeys(range(num_clients), 0)
    for round_idx in range(rounds):
        for client in select_clients(seed, round_idx, num_clients, clients_per_round):
            steps[client] += local_steps
    return steps


def scheduled_per_round(args) -> int:
    """The clients of the public schedule per round: `clients_per_round`, or under client-level DP every client
    (its Poisson sample is private, so each client's sample-level accounting assumes it takes part in every round,
    and nothing published tells which rounds it took part in)."""
    return args.num_clients if getattr(args, "client_dp", False) else args.clients_per_round


def run_schedule(args, rounds: Optional[int] = None) -> dict:
    """`scheduled_steps` of a run's `FederatedDPArguments` (its seed, clients, participation and rounds, or the first
    `rounds`)."""
    return scheduled_steps(
        seed=args.seed,
        rounds=args.num_rounds if rounds is None else rounds,
        num_clients=args.num_clients,
        clients_per_round=scheduled_per_round(args),
        local_steps=args.local_steps,
    )


def calibration_steps(args, clients) -> Optional[dict]:
    """The scheduled steps of `clients` that sigma is calibrated for under `sigma_calibration="schedule"`, or None
    (`"worst_case"`: calibrated for a client taking part in every round); `PrivacyPlan.from_args`' `scheduled_steps`."""
    if args.sigma_calibration != "schedule":
        return None
    steps = run_schedule(args)
    return {client: steps[client] for client in clients}
