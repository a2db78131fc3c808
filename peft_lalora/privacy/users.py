"""User-level DP inside a client (`privacy_unit="user"`): users, not rows, are what is sampled and accounted.

With example-level DP a person who wrote m examples is protected only as well as m examples are (group privacy:
roughly m * epsilon). Here the unit is the user named by `user_column`:

1. Poisson sampling of users. Each local step includes every user of the client independently with probability
   q_user = B / U_k (B: the expected number of users per batch, `per_device_train_batch_size`; U_k: the client's
   number of distinct users), from the client's `SecureRandom` sampling stream, as example-level sampling does
   with rows.
2. One example per sampled user, chosen uniformly among that user's examples with a second `SecureRandom` stream
   of the client (one uniform per user and step, drawn for every user, sampled or not, so that a user's choice
   does not depend on which other users were sampled).
3. The DP step is unchanged: per-sample clipping to C (a "sample" is now a user's one example, so every user's
   contribution has norm <= C however many examples they hold), Gaussian noise of std sigma * C on the sum,
   divided by the expected batch B, and the opacus accountant at (sigma, q_user, steps). Delta defaults to
   min(1e-5, 1 / U) for the client with the fewest users.

Why one example per user (the bound before clipping). microsoft/dp-transformers' `PoissonAuthorSampler` does the
same: it Poisson-samples authors and yields one example of each sampled author per batch (the author's next
example in a fixed round-robin order). We choose the example at random rather than round-robin, so that nothing
has to be carried across rounds, processes or a resume (the choice re-creates itself from the private root). The
alternative, the mean gradient of up to k examples of a user clipped as one, would need per-user gradients
assembled from k per-sample gradients before the clip, k times the per-sample memory of the step, and a cap k
that drops the rest of the user's data anyway; one example keeps the existing per-sample machinery exact (one
user = one clipped row) at the cost of using one example of each sampled user per step. A user with 1,000
examples weighs exactly as much as a user with 1: one clipped gradient, when sampled, with the same probability.

Which example is chosen does not enter the guarantee: the bound (one row of norm <= C per sampled user) holds
for any choice that depends only on that user's own examples and on randomness independent of the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError
from .sampling import poisson_sample
from .secure_random import SecureRandom

__all__ = ["user_groups", "sample_users"]


def user_groups(ids: Sequence, column: str = "user_column") -> list:
    """The positions of each user's examples, users in order of first appearance.

    Args:
        ids: the user id of every example (any hashable scalar: str or int).
        column (`str`): the dataset column the ids come from, named in errors.

    Raises:
        ConfigError: when an id is missing (None or NaN) or not hashable.
    """
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
    """One Poisson-sampled batch of users, one example each: the sorted positions of the chosen examples.

    Args:
        groups (`list[list[int]]`): each user's example positions (`user_groups`).
        sample_rate (`float`): the inclusion probability q_user of each user, in (0, 1].
        sampler (`SecureRandom`): the client's sampling stream (which users).
        picker (`SecureRandom`): the client's choice stream (which example of each user).
    """
    users = poisson_sample(len(groups), sample_rate, sampler).tolist()
    picks = picker.uniform(len(groups)).tolist()  # one per user, sampled or not: a user's pick ignores the others
    # floor(u * m) of a uniform u in (0, 1) on a 2^-53 grid: uniform up to m * 2^-53, which does not enter the
    # guarantee (module docstring); min() guards the rounding of u * m up to m.
    return sorted(groups[u][min(int(picks[u] * len(groups[u])), len(groups[u]) - 1)] for u in users)
