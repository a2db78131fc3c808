"""User-level DP inside a client (`privacy_unit="user"`): users, not rows, are what is sampled and accounted.

Example-level DP protects a person who wrote m examples only as well as m examples (group privacy: roughly
m * epsilon). Here the unit is the user named by `user_column`:

1. Each local step Poisson-samples the client's users at q_user = B / U_k (B: `per_device_train_batch_size`, U_k:
   the client's distinct users) from its `SecureRandom` sampling stream; delta defaults to min(1e-5, 1 / U) for
   the client with the fewest users.
2. One example per sampled user, chosen uniformly with a second stream (one uniform per user and step, drawn for
   every user, so that a user's choice does not depend on which others were sampled).
3. The DP step and the accountant are unchanged, at (sigma, q_user, steps): a "sample" is a user's one example,
   so every user's contribution is clipped to C however many examples they hold.

Why one example per user: microsoft/dp-transformers' `PoissonAuthorSampler` does the same (round-robin; ours is
random, so nothing is carried across rounds, processes or a resume: it re-creates itself from the private root).
Clipping the mean gradient of up to k examples of a user instead would need k times the per-sample memory and a
cap k that drops the rest of the user's data anyway. A user with 1,000 examples weighs as much as a user with 1.
Which example is chosen does not enter the guarantee: the bound (one row of norm <= C per sampled user) holds for
any choice that depends only on that user's own examples and on randomness independent of the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError
from .sampling import poisson_sample
from .secure_random import SecureRandom

__all__ = ["user_groups", "sample_users"]


def user_groups(ids: Sequence, column: str = "user_column") -> list:
    """The positions of each user's examples, users in order of first appearance, from every example's user id
    (a hashable scalar: str or int) in `ids`; `column` (the dataset column) is named in the errors."""
    groups: dict = {}
    for position, user in enumerate(ids):
        if user is None or (isinstance(user, float) and math.isnan(user)):
            raise ConfigError(
                f"`user_column` {column!r} has no user id (got {user!r}) at row {position} of the client's data: "
                "every example needs its user for user-level DP. Fill it in (a user of its own if unknown), or "
                "drop the row."
            )
        try:
            groups.setdefault(user, []).append(position)
        except TypeError as exc:
            raise ConfigError(
                f"`user_column` {column!r} must hold scalar user ids (str or int), got {type(user).__name__} at "
                f"row {position}."
            ) from exc
    return list(groups.values())


def sample_users(groups: list, sample_rate: float, sampler: SecureRandom, picker: SecureRandom) -> list:
    """One Poisson-sampled batch of users, one example each: the sorted positions of the chosen examples. `groups`:
    each user's positions (`user_groups`); `sampler` draws which users (each with probability `sample_rate`),
    `picker` which example of each (the client's two streams)."""
    users = poisson_sample(len(groups), sample_rate, sampler).tolist()
    picks = picker.uniform(len(groups)).tolist()  # one per user, sampled or not: a user's pick ignores the others
    # floor(u * m) of a uniform u in (0, 1) on a 2^-53 grid: uniform up to m * 2^-53, which does not enter the
    # guarantee (module docstring); min() guards the rounding of u * m up to m.
    return sorted(groups[u][min(int(picks[u] * len(groups[u])), len(groups[u]) - 1)] for u in users)
