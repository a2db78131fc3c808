"""Split one dataset into client shards: IID, Dirichlet label skew, or natural groups (e.g. whole movies).

The index functions return lists of example indices (sorted within each shard) and never touch the data;
`partition_dataset` turns those lists into `datasets.Dataset` views with `.select`. Every example lands in exactly
one shard (but for the remainder of an equal-size Dirichlet split), and the same seed always gives the same shards
(numpy `Generator`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ..checks import check_int, check_positive
from ..errors import ConfigError

logger = logging.getLogger(__name__)


def _check_clients(num_clients, num_examples: int, min_shard_size: int) -> None:
    check_int("num_clients", num_clients, 1)
    if num_clients > num_examples:
        raise ConfigError(
            f"`num_clients` must be <= the number of examples ({num_examples}), got {num_clients!r}; every client "
            "needs at least one example. Use fewer clients or a larger dataset."
        )
    if num_clients * min_shard_size > num_examples:
        raise ConfigError(
            f"`min_shard_size` * `num_clients` must be <= the number of examples ({num_examples}), got "
            f"{min_shard_size!r} * {num_clients!r} = {min_shard_size * num_clients}. Lower `min_shard_size` or "
            "`num_clients`."
        )


def _check_alpha(alpha) -> float:
    hint = "a finite number: 0.1 gives strongly skewed labels, 100 near-IID shards; None an exact IID split"
    return check_positive("dirichlet_alpha", alpha, hint)


def partition_iid(num_examples: int, num_clients: int, *, seed: int, min_shard_size: int = 1) -> list[list[int]]:
    """Shuffle `range(num_examples)` with `seed` and cut it into `num_clients` shards whose sizes differ by at most 1
    (each >= `min_shard_size`, else `ConfigError`)."""
    num_examples = check_int("num_examples", num_examples, 1)
    min_shard_size = check_int("min_shard_size", min_shard_size, 1)
    _check_clients(num_clients, num_examples, min_shard_size)
    rng = np.random.default_rng(check_int("seed", seed, 0))
    order = rng.permutation(num_examples)
    return [sorted(int(i) for i in part) for part in np.array_split(order, num_clients)]


def _dirichlet_once(by_class: list[np.ndarray], num_clients: int, alpha: float, rng) -> list[list[int]]:
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for idx in by_class:
        idx = rng.permutation(idx)
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
        for client, part in enumerate(np.split(idx, np.clip(cuts, 0, len(idx)))):
            shards[client].extend(int(i) for i in part)
    return [sorted(shard) for shard in shards]


def _dirichlet_equal_sizes(by_class: list[np.ndarray], num_clients: int, alpha: float, rng) -> list[list[int]]:
    pools = [rng.permutation(idx).tolist() for idx in by_class]
    size = sum(len(idx) for idx in by_class) // num_clients
    shards = []
    for proportions in rng.dirichlet(np.full(len(by_class), alpha), size=num_clients):
        want = np.floor(proportions * size).astype(np.int64)
        want[np.argsort(-proportions)[: size - want.sum()]] += 1  # the remainder to the largest proportions
        taken = []
        for pool, count in zip(pools, want):
            taken += [pool.pop() for _ in range(min(int(count), len(pool)))]
        while len(taken) < size:  # exhausted pools: fill from the fullest class
            taken.append(max(pools, key=len).pop())
        shards.append(sorted(int(i) for i in taken))
    return shards


def partition_dirichlet(
    labels: Sequence[int],
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_shard_size: int = 1,
    max_tries: int = 100,
    equal_sizes: bool = False,
) -> list[list[int]]:
    """
    Label-skewed split: for every class, the class's examples are spread over the clients with proportions drawn
    from Dirichlet(`alpha`, ..., `alpha`).

    Small `alpha` (0.1) gives shards dominated by one or two classes, large `alpha` (100) near-uniform ones. If a
    shard has fewer than `min_shard_size` examples the whole split is redrawn (same generator, so still
    deterministic), at most `max_tries` times; then `ConfigError` names the smallest shard obtained.

    `equal_sizes=True` gives every client `len(labels) // num_clients` examples (the remainder is left out), so
    that all clients have the same sampling rate: client c draws label proportions p_c ~ Dirichlet(`alpha`) and
    takes them from shuffled per-class pools; what an exhausted pool cannot give comes from the fullest class.
    """
    labels = list(labels)
    alpha = _check_alpha(alpha)
    min_shard_size = check_int("min_shard_size", min_shard_size, 1)
    max_tries = check_int("max_tries", max_tries, 1)
    _check_clients(num_clients, len(labels), min_shard_size)
    rng = np.random.default_rng(check_int("seed", seed, 0))
    try:
        classes, inverse = np.unique(np.asarray(labels), return_inverse=True)
    except TypeError as exc:
        raise ConfigError(
            f"`labels` must be sortable class ids (e.g. ints), got values such as {labels[:3]!r}."
        ) from exc
    by_class = [np.flatnonzero(inverse.reshape(-1) == c) for c in range(len(classes))]
    if equal_sizes:
        return _dirichlet_equal_sizes(by_class, num_clients, alpha, rng)
    best = 0
    for attempt in range(1, max_tries + 1):
        shards = _dirichlet_once(by_class, num_clients, alpha, rng)
        smallest = min(len(shard) for shard in shards)
        if smallest >= min_shard_size:
            logger.debug("Dirichlet split (alpha=%s) accepted after %d draw(s).", alpha, attempt)
            return shards
        best = max(best, smallest)
    raise ConfigError(
        f"`min_shard_size` = {min_shard_size} could not be met: {max_tries} Dirichlet draws with `dirichlet_alpha` = "
        f"{alpha!r} over `num_clients` = {num_clients} ({len(labels)} examples, {len(classes)} classes) left some "
        f"client with at most {best} example(s). Raise `dirichlet_alpha`, lower `num_clients` or `min_shard_size`, "
        "or raise `max_tries`."
    )


def _labels_of(dataset, label_column: str) -> list:
    columns = list(getattr(dataset, "column_names", None) or [])
    if label_column not in columns:
        raise ConfigError(
            f"`label_column` must name a column of the dataset for a Dirichlet split, got {label_column!r}; "
            f"available columns: {columns}. Pass the right `label_column` or `dirichlet_alpha=None` for IID."
        )
    return list(dataset[label_column])


def partition_indices(
    dataset,
    num_clients: int,
    *,
    dirichlet_alpha: float | None,
    seed: int,
    min_shard_size: int = 1,
    label_column: str = "labels",
) -> list[list[int]]:
    """The index lists `partition_dataset` selects (use them with `partition_fingerprint` for resume checks)."""
    num_examples = len(dataset)
    if num_examples < 1:
        raise ConfigError(f"`dataset` must hold at least one example to partition, got {num_examples} examples.")
    if dirichlet_alpha is None:
        return partition_iid(num_examples, num_clients, seed=seed, min_shard_size=min_shard_size)
    _check_alpha(dirichlet_alpha)
    _check_clients(num_clients, num_examples, check_int("min_shard_size", min_shard_size, 1))
    labels = _labels_of(dataset, label_column)
    return partition_dirichlet(labels, num_clients, alpha=dirichlet_alpha, seed=seed, min_shard_size=min_shard_size)


def partition_dataset(dataset, num_clients: int, **kwargs) -> list:
    """Split a `datasets.Dataset` into `num_clients` shards (`.select` views, no copy); the keyword arguments are
    `partition_indices`' (`dirichlet_alpha=None`: IID, else a Dirichlet label skew on `label_column`)."""
    return [dataset.select(shard) for shard in partition_indices(dataset, num_clients, **kwargs)]


def partition_fingerprint(shards: list[list[int]]) -> str:
    """SHA-256 (hex) of the shards' index lists, in order: equal exactly when the partitions are equal."""
    canonical = [[int(i) for i in shard] for shard in shards]
    payload = json.dumps(canonical, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


def partition_groups(values: Sequence, num_clients: int, *, seed: int = 0) -> list[list[int]]:
    """
    Assign whole groups (the distinct `values`, e.g. movies) to `num_clients` clients: groups in a seeded random
    order, then largest first, each to the client holding the fewest examples so far. Returns the example indices
    of each client (sorted); every example lands in exactly one client, and no group is split.
    """
    by_group: dict = defaultdict(list)
    for index, group in enumerate(values):
        by_group[group].append(index)
    if not isinstance(num_clients, int) or not 1 <= num_clients <= len(by_group):
        raise ConfigError(
            f"`num_clients` must be an integer in [1, {len(by_group)}] (the number of groups) for a split by "
            f"group, got {num_clients!r}. Use fewer clients, or a Dirichlet or IID split."
        )
    names = sorted(by_group)
    names = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    names.sort(key=lambda name: -len(by_group[name]))  # stable: ties keep the seeded order
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for name in names:
        smallest = min(range(num_clients), key=lambda c: (len(clients[c]), c))
        clients[smallest].extend(by_group[name])
    return [sorted(c) for c in clients]
