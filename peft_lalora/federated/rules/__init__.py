"""Aggregation rules: how a round's client deltas become the new global adapter, by name (`aggregation=`).

A rule is a class with `add(delta, weight)`, `survivors`, `reduce(reduce_fn)` (Accelerate: partial results across
processes) and `merged()` (the new global adapter), built by `make(global_state, args)`. Each module of this
package registers its rule(s) with `@register(name)` and is found when the package is imported, so a new rule is
one new file (and one test): both engines build their rule through `round.RoundPolicy`, by name. Rules see the
clients' releases, which under sample-level DP are already noised: any rule is post-processing of them.

Hand-written: peft, opacus and Trainer have no server-side aggregation; flwr's strategies (FedAvg,
FedTrimmedAvg, ...) aggregate whole `ArrayRecord`s inside its message API, which the in-process trainer must not
import (flwr is confined to `peft_lalora.flower`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from ...errors import ConfigError

RULES: dict[str, Callable] = {}  # name -> make(global_state, args) -> rule


def register(name: str) -> Callable:
    """Class decorator (or function wrapper): `make(global_state, args)` builds rule `name`."""

    def decorate(make):
        if name in RULES:
            raise ConfigError(f"Aggregation rule {name!r} is registered twice ({RULES[name]} and {make}).")
        RULES[name] = make
        return make

    return decorate


def make_rule(name: str, global_state, args):
    """A fresh rule `name` for one round, starting from `global_state`."""
    if name not in RULES:
        raise ConfigError(f"`aggregation` must be one of {rule_names()}, got {name!r}.")
    return RULES[name](global_state, args)


def rule_names() -> tuple:
    return tuple(sorted(RULES))


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
