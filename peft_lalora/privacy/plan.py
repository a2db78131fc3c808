"""The privacy plan of a federation: delta, sigma (given, or calibrated before training) and the ledger, built
from the clients' sizes and the settings alone (no Trainer, no model), so that the in-process trainer and each
Flower client (which plans for itself) compute the same numbers."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError, LALoraWarning
from .accounting import LEDGER_SETTINGS, PrivacyLedger, calibrate_noise_multiplier, default_delta
from .sampling import sample_rate_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacyPlan:
    """The ledger's settings (`LEDGER_SETTINGS`, with each client's Poisson rate q_k = batch_size / n_k) and how
    sigma was chosen."""

    noise_multiplier: float
    delta: float
    sample_rates: dict
    accountant: str
    per_sample_max_grad_norm: float
    target_epsilon: Optional[float]
    calibrated_steps: int  # the most local steps a client was calibrated for
    # "schedule" (every client's scheduled steps), "worst_case" (a client in every round), or "given" (sigma set)
    calibration: str = "worst_case"

    @classmethod
    def from_args(cls, args, client_sizes: dict, scheduled_steps: Optional[dict] = None) -> PrivacyPlan:
        """The plan of `FederatedDPArguments` for clients `{id: n_k}` (every client in-process, a Flower client for
        itself; under `privacy_unit="user"` n_k counts users). With `target_epsilon`, sigma is calibrated so that
        every client meets it for its `scheduled_steps[id]` (the public schedule, known before training), or, without
        them, for a client in all `num_rounds` rounds at the largest rate (the worst case)."""
        target_epsilon, noise_multiplier = args.target_epsilon, args.noise_multiplier
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ConfigError(
                "Give exactly one of `target_epsilon` (sigma is calibrated) and `noise_multiplier` "
                f"(epsilon is reported), got {target_epsilon!r} and {noise_multiplier!r}."
            )
        batch_size, unit = args.per_device_train_batch_size, f"{args.privacy_unit}s"
        rates = {k: sample_rate_for(batch_size, n, client=k, unit=unit) for k, n in client_sizes.items()}
        delta = plan_delta(min(client_sizes.values()), args.target_delta, args.allow_large_delta)
        steps, calibration = args.num_rounds * args.local_steps, "given"
        if noise_multiplier is None:
            if scheduled_steps is not None:  # every client for its own (q_k, steps_k)
                clients = sorted(rates)
                q, n = [rates[k] for k in clients], [scheduled_steps[k] for k in clients]
                steps, calibration = max(n), "schedule"
            else:  # a client in every round at the largest rate
                q, n, calibration = max(rates.values()), steps, "worst_case"
            noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=q, steps=n, accountant=args.accountant
            )
        clip = args.per_sample_max_grad_norm
        logger.info(
            "DP: sigma=%.4f C=%s delta=%.2e q in [%.4f, %.4f], %d steps per client at most",
            noise_multiplier,
            clip,
            delta,
            min(rates.values()),
            max(rates.values()),
            steps,
        )
        return cls(noise_multiplier, delta, rates, args.accountant, clip, target_epsilon, steps, calibration)

    def new_ledger(self) -> PrivacyLedger:
        """An empty ledger: one accountant per client, refusing releases beyond `target_epsilon`."""
        return PrivacyLedger(sample_rates=self.sample_rates, **{k: getattr(self, k) for k in LEDGER_SETTINGS})


def plan_delta(smallest: int, target_delta: Optional[float], allow_large_delta: bool = False) -> float:
    """`target_delta`, or min(1e-5, 1 / n) for the smallest client; a delta >= 1 / n is refused unless allowed."""
    delta = target_delta if target_delta is not None else default_delta(smallest)
    if delta >= 1 / smallest:
        if not allow_large_delta:
            raise ConfigError(
                f"`target_delta` must be < 1 / n_k = {1 / smallest:.3g} for the smallest client "
                f"(n_k = {smallest}), got {delta!r}: a larger delta allows releasing an example "
                "outright. Lower it, or set `allow_large_delta=True` to accept the risk."
            )
        warnings.warn(f"`target_delta`={delta} >= 1/n_k for the smallest client.", LALoraWarning, stacklevel=3)
    return delta
