"""Client partitioning: coverage, determinism, label skew, minimum shard size, natural groups, bad input."""

from collections import Counter

import numpy as np
import pytest
from datasets import Dataset

from peft_lalora import ConfigError
from peft_lalora.federated.partition import (
    partition_dataset,
    partition_dirichlet,
    partition_fingerprint,
    partition_groups,
    partition_iid,
    partition_indices,
)


def _assert_exact_cover(shards, num_examples):
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(num_examples)), "every example must be in exactly one shard"


def _dominant_fraction(shard, labels):
    counts = Counter(labels[i] for i in shard)
    return max(counts.values()) / len(shard)


# ---------------------------------------------------------------- IID


def test_iid_covers_every_example_once_with_balanced_sizes():
    # Prepare
    num_examples, num_clients = 103, 10
    # Execute
    shards = partition_iid(num_examples, num_clients, seed=0)
    # Assert: 103 = 3 * 11 + 7 * 10
    _assert_exact_cover(shards, num_examples)
    assert sorted(len(s) for s in shards) == [10] * 7 + [11] * 3
    assert all(s == sorted(s) for s in shards)


def test_iid_is_deterministic_under_seed_and_differs_across_seeds():
    # Execute
    first = partition_iid(50, 5, seed=7)
    again = partition_iid(50, 5, seed=7)
    other = partition_iid(50, 5, seed=8)
    # Assert
    assert first == again
    assert first != other
    assert partition_fingerprint(first) == partition_fingerprint(again)
    assert partition_fingerprint(first) != partition_fingerprint(other)


def test_iid_shuffles_rather_than_cutting_contiguous_blocks():
    # Execute
    shards = partition_iid(100, 4, seed=0)
    # Assert: a contiguous cut would give shards [0..24], [25..49], ...
    assert shards[0] != list(range(25))


def test_iid_single_client_gets_everything():
    assert partition_iid(5, 1, seed=0) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_examples": 10, "num_clients": 0}, r"`num_clients` must be an integer >= 1, got 0"),
        ({"num_examples": 10, "num_clients": 11}, r"`num_clients` must be <= the number of examples \(10\), got 11"),
        ({"num_examples": 10, "num_clients": 2.0}, r"`num_clients` must be an integer"),
        (
            {"num_examples": 10, "num_clients": 4, "min_shard_size": 3},
            r"`min_shard_size` \* `num_clients`.*3 \* 4 = 12",
        ),
        ({"num_examples": 10, "num_clients": 2, "seed": -1}, r"`seed` must be an integer >= 0, got -1"),
    ],
)
def test_iid_bad_input_raises_clear_errors(kwargs, match):
    kwargs.setdefault("seed", 0)
    with pytest.raises(ConfigError, match=match):
        partition_iid(**kwargs)


# ---------------------------------------------------------------- Dirichlet


def test_dirichlet_covers_every_example_once():
    # Prepare
    labels = [i % 3 for i in range(301)]
    # Execute
    shards = partition_dirichlet(labels, 7, alpha=0.5, seed=1)
    # Assert
    assert len(shards) == 7
    _assert_exact_cover(shards, len(labels))
    assert all(len(s) >= 1 for s in shards)


def test_dirichlet_is_deterministic_under_seed_and_differs_across_seeds():
    labels = [i % 4 for i in range(400)]
    first = partition_dirichlet(labels, 8, alpha=0.5, seed=3)
    assert first == partition_dirichlet(labels, 8, alpha=0.5, seed=3)
    assert first != partition_dirichlet(labels, 8, alpha=0.5, seed=4)


def test_small_alpha_skews_labels_and_large_alpha_is_near_uniform():
    # Prepare: balanced binary labels, 10 clients
    labels = [i % 2 for i in range(2000)]
    for seed in range(3):
        # Execute
        skewed = partition_dirichlet(labels, 10, alpha=0.1, seed=seed, min_shard_size=5)
        uniform = partition_dirichlet(labels, 10, alpha=1000.0, seed=seed)
        # Assert: alpha=0.1 -> most shards are > 90 % one class; alpha=1000 -> every shard within 40-60 %
        dominated = [_dominant_fraction(s, labels) > 0.9 for s in skewed]
        assert sum(dominated) >= 6, dominated
        assert all(_dominant_fraction(s, labels) <= 0.6 for s in uniform)
        assert all(150 <= len(s) <= 250 for s in uniform)


def test_dirichlet_accepts_string_labels():
    labels = ["fresh", "rotten"] * 20
    shards = partition_dirichlet(labels, 4, alpha=1.0, seed=0)
    _assert_exact_cover(shards, 40)


def test_dirichlet_enforces_min_shard_size_by_resampling():
    # Prepare: alpha=0.5 over 10 clients leaves some client below 5 examples on the first draw of this seed
    labels = [i % 2 for i in range(200)]
    with pytest.raises(ConfigError, match=r"1 Dirichlet draws"):
        partition_dirichlet(labels, 10, alpha=0.5, seed=0, min_shard_size=5, max_tries=1)
    # Execute
    shards = partition_dirichlet(labels, 10, alpha=0.5, seed=0, min_shard_size=5)
    # Assert
    assert min(len(s) for s in shards) >= 5
    _assert_exact_cover(shards, 200)


def test_dirichlet_unreachable_min_shard_size_raises_naming_the_knobs():
    # Prepare: 2 examples per client on average, alpha tiny: no draw gives every client >= 2
    labels = [i % 2 for i in range(20)]
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"`min_shard_size` = 2 could not be met") as info:
        partition_dirichlet(labels, 10, alpha=0.01, seed=0, min_shard_size=2, max_tries=5)
    message = str(info.value)
    assert "`dirichlet_alpha` = 0.01" in message and "`num_clients` = 10" in message
    assert "at most 1 example" in message or "at most 0 example" in message


@pytest.mark.parametrize(
    "alpha, match",
    [(0.0, r"`dirichlet_alpha` must be > 0, got 0.0"), (-1, r"must be > 0, got -1"), (float("nan"), "finite")],
)
def test_dirichlet_bad_alpha(alpha, match):
    with pytest.raises(ConfigError, match=match):
        partition_dirichlet([0, 1, 0, 1], 2, alpha=alpha, seed=0)


def test_dirichlet_too_many_clients():
    with pytest.raises(ConfigError, match=r"`num_clients` must be <= the number of examples \(4\), got 5"):
        partition_dirichlet([0, 1, 0, 1], 5, alpha=1.0, seed=0)


# ---------------------------------------------------------------- datasets


def _dataset(n=60):
    return Dataset.from_dict({"text": [f"t{i}" for i in range(n)], "labels": [i % 3 for i in range(n)]})


def test_partition_dataset_iid_selects_the_index_lists():
    # Prepare
    ds = _dataset()
    # Execute
    shards = partition_dataset(ds, 4, dirichlet_alpha=None, seed=0)
    indices = partition_iid(60, 4, seed=0)
    # Assert
    assert [len(s) for s in shards] == [15] * 4
    for shard, idx in zip(shards, indices):
        assert shard["text"] == [f"t{i}" for i in idx]


def test_partition_dataset_dirichlet_matches_partition_dirichlet():
    ds = _dataset()
    shards = partition_dataset(ds, 3, dirichlet_alpha=0.5, seed=2)
    expected = partition_dirichlet([i % 3 for i in range(60)], 3, alpha=0.5, seed=2)
    assert partition_indices(ds, 3, dirichlet_alpha=0.5, seed=2) == expected
    for shard, idx in zip(shards, expected):
        assert shard["text"] == [f"t{i}" for i in idx]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_clients": 0, "dirichlet_alpha": None}, r"`num_clients` must be an integer >= 1, got 0"),
        ({"num_clients": 61, "dirichlet_alpha": None}, r"`num_clients` must be <= the number of examples \(60\)"),
        ({"num_clients": 61, "dirichlet_alpha": 1.0}, r"`num_clients` must be <= the number of examples \(60\)"),
        ({"num_clients": 3, "dirichlet_alpha": 0}, r"`dirichlet_alpha` must be > 0, got 0"),
        (
            {"num_clients": 3, "dirichlet_alpha": 1.0, "label_column": "label"},
            r"available columns: \['text', 'labels'\]",
        ),
    ],
)
def test_partition_dataset_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        partition_dataset(_dataset(), seed=0, **kwargs)


def test_fingerprint_is_sha256_of_the_index_lists():
    import hashlib

    assert partition_fingerprint([[0, 2], [1]]) == hashlib.sha256(b"[[0,2],[1]]").hexdigest()
    assert partition_fingerprint([[0, 2], [1]]) != partition_fingerprint([[1], [0, 2]])
    assert partition_fingerprint([np.array([0, 2]), [np.int64(1)]]) == partition_fingerprint([[0, 2], [1]])


# ---------------------------------------------------------------- natural groups


def test_groups_by_hand():
    # Prepare: groups a (3 examples), b (2), c (1); two clients
    groups = ["a", "b", "a", "c", "b", "a"]
    # Execute
    shards = partition_groups(groups, 2, seed=0)
    # Assert: a alone on one client; b and c on the other
    assert sorted(shards) == [[0, 2, 5], [1, 3, 4]]
    assert partition_groups(groups, 2, seed=0) == shards


def test_groups_refuse_more_clients_than_groups():
    with pytest.raises(ValueError, match="`num_clients` must be an integer in \\[1, 3\\].*got 4"):
        partition_groups(["a", "b", "c"], 4)


# ---------------------------------------------------------------- the benchmarks' former Dirichlet splits


def _benchmark_dirichlet(labels, num_clients, alpha, seed, min_size):
    """benchmarks/_pu_setup.py's `dirichlet_shards` before it called `partition_dirichlet` (index lists)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        clients = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
            for c, part in enumerate(np.split(idx, cuts)):
                clients[c].extend(part.tolist())
        if min(len(c) for c in clients) >= min_size:
            return [sorted(c) for c in clients]
    raise ValueError("no split")


def _benchmark_balanced_dirichlet(labels, num_clients, alpha, seed):
    """benchmarks/_pu_setup.py's `balanced_dirichlet_shards` before it called `partition_dirichlet`."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {int(c): rng.permutation(np.flatnonzero(labels == c)).tolist() for c in classes}
    size = len(labels) // num_clients
    clients = []
    for proportions in rng.dirichlet([alpha] * len(classes), size=num_clients):
        want = np.floor(proportions * size).astype(int)
        want[np.argsort(-proportions)[: size - want.sum()]] += 1
        taken = []
        for c, k in zip(classes, want):
            taken += [pools[int(c)].pop() for _ in range(min(int(k), len(pools[int(c)])))]
        while len(taken) < size:
            taken.append(pools[max(pools, key=lambda c: len(pools[c]))].pop())
        clients.append(sorted(taken))
    return clients


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("alpha, min_size", [(0.1, 1), (0.1, 500), (0.5, 40), (5.0, 64)])  # 0.1, 500: redrawn
def test_partition_dirichlet_gives_the_benchmarks_former_shards(seed, alpha, min_size):
    labels = np.random.default_rng(100 + seed).integers(0, 10, 3500).tolist()
    expected = _benchmark_dirichlet(labels, 5, alpha, seed, min_size)
    assert partition_dirichlet(labels, 5, alpha=alpha, seed=seed, min_shard_size=min_size, max_tries=1000) == expected
    balanced = partition_dirichlet(labels, 5, alpha=alpha, seed=seed, equal_sizes=True)
    assert balanced == _benchmark_balanced_dirichlet(labels, 5, alpha, seed)
    assert [len(s) for s in balanced] == [700] * 5 and len({i for s in balanced for i in s}) == 3500
