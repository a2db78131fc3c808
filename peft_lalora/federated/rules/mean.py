"""`aggregation="mean"` (the default): the weighted mean of the clients' deltas, tensor by tensor
(`aggregation.Aggregator`; weights by `aggregation_weights`). Under sample-level DP it is post-processing of the
clients' noised releases."""

from __future__ import annotations

from ..aggregation import Aggregator


def make(global_state, args) -> Aggregator:
    return Aggregator(global_state)
