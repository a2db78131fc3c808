"""Client partitioning: coverage, determinism, label skew, minimum shard size, natural groups, bad input."""

from collections import Counter

import numpy as np
import pytest
from datasets import Dataset

from peft_lalora import ConfigError
from peft_lalora.federated.partition import (
    group_by,
    group_indices,
    partition_dataset,
    partition_dirichlet,
    partition_fingerprint,
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


def test_group_indices_one_shard_per_value_in_sorted_order():
    values = ["b", "a", "b", "c", "a"]
    assert group_indices(values) == [[1, 4], [0, 2], [3]]


def test_group_indices_merges_small_groups_into_the_next():
    # Prepare: sizes a:1, b:1, c:3, d:2, e:1 ; min 2
    values = ["c", "a", "c", "b", "d", "c", "d", "e"]
    # Execute
    shards = group_indices(values, min_shard_size=2)
    # Assert: a+b -> [1, 3]; c -> [0, 2, 5]; d -> [4, 6]; e (too small, last) joins d
    assert shards == [[1, 3], [0, 2, 5], [4, 6, 7]]
    _assert_exact_cover(shards, len(values))


def test_group_by_dataset_and_errors():
    # Prepare
    ds = Dataset.from_dict({"movie": ["m2", "m1", "m2", "m3"], "text": ["w", "x", "y", "z"]})
    # Execute
    shards = group_by(ds, "movie")
    merged = group_by(ds, "movie", min_shard_size=2)
    # Assert
    assert [s["text"] for s in shards] == [["x"], ["w", "y"], ["z"]]
    # m1 (1 example) merges into m2 -> 3 examples; m3 (1 example) is last and joins that shard
    assert [s["text"] for s in merged] == [["w", "x", "y", "z"]]
    with pytest.raises(ConfigError, match=r"`column` must name a column.*'movie_name'.*\['movie', 'text'\]"):
        group_by(ds, "movie_name")
    with pytest.raises(ConfigError, match=r"`min_shard_size` must be <= the number of examples \(4\), got 5"):
        group_by(ds, "movie", min_shard_size=5)
