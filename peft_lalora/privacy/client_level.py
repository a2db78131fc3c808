"""Client-level DP (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
the accounting of the server's mechanism. Each round samples every client with probability q = m / N (Poisson,
from the private root), clips each sampled client's whole update to `client_clip_norm` S, adds N(0, (z S)^2) to
the sum and divides by the expected count m: one subsampled Gaussian release per round, whatever a client's data.
Adjacent federations differ in ONE CLIENT's whole data (add or remove a client), so epsilon covers everything a
client holds, across all its rounds. The accounting is the sample level's (`privacy.accounting`: opacus' RDP
composes (z, q) over the rounds run, and its `get_noise_multiplier` calibrates z for a target epsilon, checked at
the answer); hand-written here is only the wiring to the client unit, which opacus' `PrivacyEngine` does per example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import PrivacyBudgetExceededError
from .accounting import calibrate_noise_multiplier, compute_epsilon, default_delta

CLIENT_UNIT = "client"
CLIENT_GUARANTEE = (
    "Client-level DP (DP-FedAvg): adding or removing one client's whole data changes the distribution of the "
    "released global adapters by at most (epsilon, delta). It assumes the server is trusted: it sees each "
    "client's clipped update before the noise."
)


@dataclass(frozen=True)
class ClientLevelPlan:
    """The server's client-level mechanism: z, S, q = m / N, the rounds, delta, and the budget."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    expected_clients: int
    num_clients: int
    rounds: int
    delta: float
    target_epsilon: Optional[float] = None

    @classmethod
    def from_args(cls, args) -> ClientLevelPlan:
        """From `FederatedDPArguments` with `client_dp=True` (validated there): z given, or calibrated so that
        `num_rounds` rounds at q = clients_per_round / num_clients meet `client_target_epsilon`."""
        q = args.clients_per_round / args.num_clients
        delta = args.client_target_delta or default_delta(args.num_clients)  # min(1e-5, 1 / N)
        z = args.client_noise_multiplier
        if args.client_target_epsilon is not None:
            z = calibrate_noise_multiplier(  # opacus' search, checked at its answer, as for the sample level
                target_epsilon=args.client_target_epsilon, target_delta=delta, sample_rate=q, steps=args.num_rounds
            )
        return cls(
            noise_multiplier=float(z),
            clip_norm=float(args.client_clip_norm),
            sample_rate=q,
            expected_clients=args.clients_per_round,
            num_clients=args.num_clients,
            rounds=args.num_rounds,
            delta=delta,
            target_epsilon=args.client_target_epsilon,
        )

    def epsilon(self, rounds: int) -> float:
        """Epsilon after `rounds` Poisson-subsampled Gaussian rounds (opacus' RDP, as every epsilon of this library:
        `accounting.compute_epsilon`); 0 before any round."""
        return compute_epsilon(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=rounds, delta=self.delta
        )

    @property
    def budget(self) -> float:
        """The epsilon no release may exceed: the target, or (z given) the epsilon of the configured rounds."""
        return self.target_epsilon if self.target_epsilon is not None else self.epsilon(self.rounds)

    def check_release(self, rounds_done: int) -> None:
        """Refuse round `rounds_done` (counting from 0) before anything is released when it would exceed the
        budget."""
        after = self.epsilon(rounds_done + 1)
        if after > self.budget * (1 + 1e-9):
            raise PrivacyBudgetExceededError(
                f"Client-level release refused: round {rounds_done} would take the client-level epsilon to "
                f"{after:.4f} (delta={self.delta:g}), above the budget {self.budget:.4f} "
                f"(`client_target_epsilon` = {self.target_epsilon}, `num_rounds` = {self.rounds}). Nothing was "
                "released. Stop here, or start a run calibrated for more rounds."
            )

    def report(self, rounds: int) -> dict:
        """The client-level entry of `privacy_report.json` after `rounds` released rounds."""
        return {
            "unit": CLIENT_UNIT,
            "epsilon": self.epsilon(rounds),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "client_clip_norm": self.clip_norm,
            "sample_rate": self.sample_rate,
            "rounds": int(rounds),
            "rounds_configured": self.rounds,
            "expected_clients_per_round": self.expected_clients,
            "num_clients": self.num_clients,
            "target_epsilon": self.target_epsilon,
            "accountant": "rdp",
            "sampling": "Poisson, rate clients_per_round / num_clients, from the private root (ChaCha20)",
            "guarantee": CLIENT_GUARANTEE,
        }
