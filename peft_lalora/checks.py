"""The argument checks the package shares: each returns the value, or raises `ConfigError` naming the argument,
the value and the fix."""

from __future__ import annotations

import math
from numbers import Integral, Real

from .errors import ConfigError


def check_int(name: str, value, minimum: int = 0, fix: str = "") -> int:
    """An integer >= `minimum` (a bool is not one; numpy's are)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ConfigError(f"`{name}` must be an integer >= {minimum}, got {value!r}. {fix}".rstrip())
    return int(value)


def check_number(name: str, value, rule: str, ok, fix: str = "") -> float:
    """A real number (not a bool, not NaN) for which `ok` holds; `rule` says which in the message."""
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)) or not ok(float(value)):
        raise ConfigError(f"`{name}` must be {rule}, got {value!r}. {fix}".rstrip())
    return float(value)


def check_positive(name: str, value, hint: str) -> float:
    """A finite number > 0; `hint` says what the argument is, or an example."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < math.inf:
        raise ConfigError(f"`{name}` must be > 0, got {value!r} ({hint}).")
    return float(value)


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        extra = " GDP is never used for reporting epsilon." if name == "accountant" and value == "gdp" else ""
        raise ConfigError(f"`{name}` must be one of {choices}, got {value!r}.{extra}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(
            f"`{name}` must be a bool (True or False), got {value!r} of type {type(value).__name__}; "
            "a string such as 'False' would count as true."
        )


def given_settings(args, names) -> str:
    """The settings of `names` that `args` sets (not None), as "`name`=value, ..."; "" when none is set."""
    return ", ".join(f"`{n}`={getattr(args, n)!r}" for n in names if getattr(args, n) is not None)


def plain(value):
    """An enum-valued setting (a `TrainingArguments` field) as its string value (JSON, equal across a resume)."""
    return getattr(value, "value", value)
