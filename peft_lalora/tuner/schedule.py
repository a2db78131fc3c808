"""Which LoRA factor trains at a given (round, local step): the only thing that tells the methods apart."""

from __future__ import annotations

from ..checks import check_int
from ..errors import ConfigError

BOTH = frozenset({"A", "B"})
ONLY_A = frozenset({"A"})
ONLY_B = frozenset({"B"})


def trainable_factors(config, round_idx: int, step: int) -> frozenset:
    """The factors that train at local step `step` of round `round_idx` (both from 0), by `config.alternation`
    (`LALoraConfig`'s docstring); "local" phases restart at every round (each client starts from the global adapter).
    """
    check_int("round_idx", round_idx)
    check_int("step", step)
    if config.alternation == "none":
        return BOTH
    if config.alternation == "freeze_a":
        return ONLY_B
    counter = step if config.alternation == "local" else round_idx
    phase = counter // config.alternation_period
    first, second = (ONLY_B, ONLY_A) if config.first_factor == "B" else (ONLY_A, ONLY_B)
    return first if phase % 2 == 0 else second


def check_factors(factors) -> frozenset:
    """Validate a user-given set of factors and return it as a frozenset."""
    value = frozenset(factors) if not isinstance(factors, str) else frozenset({factors})
    if not value or not value <= BOTH:
        raise ConfigError(f"`factors` must be a non-empty subset of {{'A', 'B'}}, got {factors!r}.")
    return value
