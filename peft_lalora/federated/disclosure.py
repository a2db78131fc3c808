"""What a run may say about its private training data outside epsilon.

Under DP, nothing computed from the training examples without noise leaves the run (log line, metric, error text,
return value) unless the user asked for it by name (`log_private_metrics=True`): the training loss, the counts of
sampled and dropped examples, and the text of an error raised inside a client's local round or data check (which
may quote a sequence length, a realised batch size or a shape). A failure itself is released (the client's
update is missing): only its exception type and a fixed explanation are said. A non-private run says everything.
"""

from __future__ import annotations

from ..errors import ClientDataError, ConfigError, UntraceableModelError
from .client_update import ClientUpdateError

PRIVATE_METRICS = ("loss", "sampled_examples", "dropped_examples")  # per-round logs outside the DP guarantee
OPT_IN = "`log_private_metrics=True`"
# The library's own errors whose texts are written to hold no value computed from private examples (a ConfigError
# quotes settings, and at most a shard's size, which the sample rate publishes anyway)
VALUE_FREE_ERRORS = (ClientDataError, ClientUpdateError, ConfigError, UntraceableModelError)


def reveals_private(args) -> bool:
    """Whether the run may log and return values computed from private data without noise (never by default
    under sample-level or client-level DP)."""
    private = args.dp or getattr(args, "client_dp", False) is True
    return not private or getattr(args, "log_private_metrics", False) is True


def error_text(exc: BaseException, *, reveal: bool, where: str, opt_in: str = OPT_IN) -> str:
    """`"Type: message"` when `reveal` (or for the library's value-free errors), else the exception's type and a
    fixed explanation: `where` says where it was raised (e.g. "inside the client's local round")."""
    if reveal or isinstance(exc, VALUE_FREE_ERRORS):
        return f"{type(exc).__name__}: {exc}"
    return (
        f"{type(exc).__name__} {where}. Its text is withheld: it may quote lengths, shapes, batch sizes or values "
        f"computed from private examples, which no noise covers. Set {opt_in} to see it (outside the DP guarantee)"
    )
