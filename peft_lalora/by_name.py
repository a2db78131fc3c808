"""Call a function with its keyword arguments read, by name, from a settings object.

`FederatedDPArguments` names each setting as the functions that read it name their parameter (`local_steps`,
`accountant`, `per_sample_max_grad_norm`, ...). Handing settings on as `name=args.name` lists writes every
name twice at every call site and drifts when a parameter is added; `call_by_name` reads each parameter from
the same-named attribute instead, so only the parameters whose names differ are written out.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def call_by_name(fn: Callable, settings: Any, **given) -> Any:
    """`fn(**given, p=settings.p, ...)` for every other named parameter `p` of `fn` (a class: of its constructor).

    A parameter that `settings` lacks raises `AttributeError` naming it, even where `fn` has a default for it:
    a default never stands in silently for a setting.
    """
    names = [p.name for p in inspect.signature(fn).parameters.values() if p.kind in _NAMED and p.name not in given]
    return fn(**given, **{name: getattr(settings, name) for name in names})
