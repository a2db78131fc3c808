"""`aggregation="trimmed_mean"`: the coordinate-wise trimmed mean of the clients' deltas (Yin et al. 2018), robust
to a few clients sending outlying updates: per coordinate, the `aggregation_trim` fraction of the largest and of
the smallest values is dropped and the rest averaged (flwr's `FedTrimmedAvg` with `beta`, on deltas, per tensor).

Post-processing of the clients' releases, like any rule (`rules`); not wrappable by client-level DP, which needs
a rule that releases a sum with a bounded per-client sensitivity (`"mean"`).

Unweighted (a client is one vote), so `aggregation_weights` must be "uniform". It keeps every delta of the round
(memory: clients x adapter) and needs them all in one process, so it does not run under Accelerate.
"""

from __future__ import annotations

import math

import torch

from ...errors import ConfigError
from ..aggregation import apply_delta, check_delta


class TrimmedMean:
    """Coordinate-wise trimmed mean over the clients that sent a tensor; tensors nobody sent keep their value."""

    def __init__(self, global_state, trim: float):
        if not (isinstance(trim, (int, float)) and 0 <= trim < 0.5):
            raise ConfigError(f"`aggregation_trim` must be in [0, 0.5), got {trim!r}.")
        self.global_state = dict(global_state)
        self.trim = float(trim)
        self.deltas = {n: [] for n in self.global_state}
        self.survivors = 0

    @torch.no_grad()
    def add(self, delta, weight: float = 1.0) -> None:
        check_delta(delta, self.global_state, weight, self.survivors)
        for name, value in delta.items():
            self.deltas[name].append(value.detach().clone())
        self.survivors += 1

    def reduce(self, reduce_fn=None) -> None:
        if reduce_fn is not None:
            raise ConfigError(
                '`aggregation="trimmed_mean"` needs every delta of the round in one process, but the run has '
                "several (Accelerate). Run it in one process, or use `aggregation='mean'`."
            )

    @torch.no_grad()
    def mean(self) -> dict:
        if self.survivors == 0:
            raise ConfigError("No client delta was added: a round needs at least one surviving client to aggregate.")
        out = {}
        for name, values in self.deltas.items():
            if values:
                n = len(values)
                k = math.floor(self.trim * n)
                ordered = torch.sort(torch.stack(values), dim=0).values
                out[name] = ordered[k : n - k].mean(dim=0)
        return out

    def merged(self) -> dict:
        return apply_delta(self.global_state, self.mean())


def make(global_state, args) -> TrimmedMean:
    return TrimmedMean(global_state, args.aggregation_trim)
