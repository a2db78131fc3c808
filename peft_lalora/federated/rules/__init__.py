"""Aggregation rules: how a round's client deltas become the new global adapter, by name (`aggregation=`).

A rule is a class with `add(delta, weight)`, `survivors`, `reduce(reduce_fn)` (Accelerate: partial results across
processes) and `merged()` (the new global adapter), built by its module's `make(global_state, args)`. A new rule is
one new file, named in `RULES` (and one test): both engines build their rule through `round.RoundPolicy`, by name.
Rules see the clients' releases, which under sample-level DP are already noised: any rule is post-processing of them.

Hand-written: peft, opacus and Trainer have no server-side aggregation; flwr's strategies (FedAvg,
FedTrimmedAvg, ...) aggregate whole `ArrayRecord`s inside its message API, which the in-process trainer must not
import (flwr is confined to `peft_lalora.flower`).
"""

from __future__ import annotations

from ...errors import ConfigError
from . import mean, trimmed_mean

RULES = {"mean": mean.make, "trimmed_mean": trimmed_mean.make}  # name -> make(global_state, args) -> rule


def make_rule(name: str, global_state, args):
    """A fresh rule `name` for one round, starting from `global_state`."""
    if name not in RULES:
        raise ConfigError(f"`aggregation` must be one of {rule_names()}, got {name!r}.")
    return RULES[name](global_state, args)


def rule_names() -> tuple:
    return tuple(sorted(RULES))
