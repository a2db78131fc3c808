"""`RoundPolicy`: the server's side of a round, one object for both engines (`FederatedDPTrainer._run_round` and
the Flower `LALoraStrategy`): client selection, weights, the aggregation rule (`rules`), abort or release. The
engines keep only what is theirs: running the clients in-process, or sending messages and reading replies.

With `client_dp=True` the same round is DP-FedAvg (`client_dp`): the clients are a Poisson sample from the private
root, the budget is checked before the round, and the rule is wrapped by `ClientDPAggregator` (clip, noise,
fixed denominator); such a round always releases.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

from ..errors import ConfigError
from ..privacy.client_level import ClientLevelPlan
from .client_dp import ClientDPAggregator, sample_clients
from .rules import make_rule
from .seeding import select_clients

logger = logging.getLogger(__name__)


class RoundPolicy:
    """
    Args:
        args (`FederatedDPArguments`): `num_clients`, `clients_per_round`, `seed` (the public schedule),
            `aggregation` (the rule), `aggregation_weights` and `min_clients_per_round`; with `client_dp`, its
            `client_*` settings.
        private_root: the server's private root (client-level DP's sampling and noise).
        round_tensors (`callable`): round -> the tensors its clients train (`client_dp.round_tensor_names`).
    """

    def __init__(self, args, *, private_root=None, round_tensors=None):
        self.args = args
        self.client_level = ClientLevelPlan.from_args(args) if getattr(args, "client_dp", False) else None
        if self.client_level is not None and (private_root is None or round_tensors is None):
            raise ConfigError("`client_dp` needs the server's private root and the round's tensors.")
        self.private_root, self.round_tensors = private_root, round_tensors
        if getattr(args, "world_size", 1) > 1 and args.aggregation != "mean":
            raise ConfigError(
                f"`aggregation`={args.aggregation!r} needs every delta of a round in one process, but the run has "
                f"{args.world_size} (Accelerate). Run it in one process, or use `aggregation='mean'`."
            )

    def select(self, round_idx: int) -> list:
        """The round's clients, sorted: the public schedule of `seeding.select_clients`, or under client-level DP
        a Poisson sample from the private root, after the client-level budget is checked (nothing released on a
        refusal)."""
        args = self.args
        if self.client_level is not None:
            self.client_level.check_release(round_idx)
            return sample_clients(self.private_root, round_idx, args.num_clients, self.client_level.sample_rate)
        return select_clients(args.seed, round_idx, args.num_clients, args.clients_per_round)

    def weight(self, num_examples) -> float:
        """A surviving client's aggregation weight: 1, or its shard size under `aggregation_weights="num_samples"`."""
        return 1.0 if self.args.aggregation_weights == "uniform" else float(num_examples)

    def aggregator(self, global_state: dict, round_idx: int):
        """A fresh aggregation rule for round `round_idx`; add the survivors in client order."""
        rule = make_rule(self.args.aggregation, global_state, self.args)
        if self.client_level is None:
            return rule
        names = self.round_tensors(round_idx)
        return ClientDPAggregator(rule, self.client_level, self.private_root, round_idx, names)

    def may_abort(self) -> bool:
        """Whether a round with fewer than `min_clients_per_round` clients is aborted (nothing released); never
        under client-level DP, where the count of survivors is not noised and every round releases."""
        return self.client_level is None

    def client_level_report(self, rounds: int):
        """The client-level entry of the privacy report after `rounds` rounds, or None without `client_dp`."""
        return None if self.client_level is None else self.client_level.report(rounds)

    def close(self, total, round_idx: int, selected: int) -> Optional[dict]:
        """The new global adapter, or None when the round is aborted: fewer than `min_clients_per_round` of its
        `selected` clients survived (logged)."""
        if self.may_abort() and total.survivors < self.args.min_clients_per_round:
            logger.warning(
                "round %d aborted: %d of %d clients survived, fewer than min_clients_per_round=%d; nothing released",
                round_idx,
                total.survivors,
                selected,
                self.args.min_clients_per_round,
            )
            return None
        return total.merged()


def finite_mean(values) -> float:
    """The mean of the finite values (a client whose loss is NaN or inf is left out); NaN when there are none."""
    finite = [float(v) for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
