"""recipes/data.py: the offline Rotten Tomatoes loader (counts vs DATA.md, fixed split, movie clients),
tokenisation, the digits images and the offline `evaluate` metric."""

import importlib.util
import os
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("recipe_data", os.path.join(ROOT, "recipes", "data.py"))
data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(data)


@pytest.fixture(scope="module")
def rt_splits():
    return data.load_rotten_tomatoes()


# ---------------------------------------------------------------- Rotten Tomatoes


def test_raw_rows_match_the_published_counts():
    # Execute
    counts = Counter(row["category"] for row in data.read_rotten_tomatoes_rows())
    # Assert: DATA.md, 7,403 fresh + 5,405 rotten (+ plot rows, dropped later)
    assert counts["fresh"] == 7403
    assert counts["rotten"] == 5405


def test_examples_are_deduplicated_labelled_and_from_the_508_movies():
    # Execute
    examples = data.rotten_tomatoes_examples()
    # Assert
    assert len(examples) == 12752
    assert len({e["text"] for e in examples}) == 12752
    assert {e["label"] for e in examples} == {0, 1}
    raw_movies = {r["movie_name"] for r in data.read_rotten_tomatoes_rows() if r["category"] != "plot"}
    assert len(raw_movies) == 508
    # each text kept once (first occurrence): one movie's snippets all appear earlier under other movies
    assert len({e["movie"] for e in examples}) == 507
    raw = {r["text"]: r["category"] for r in data.read_rotten_tomatoes_rows() if r["category"] != "plot"}
    for e in examples[:200]:  # fresh=1, rotten=0, straight from the file
        assert e["label"] == {"fresh": 1, "rotten": 0}[raw[e["text"]]]


def test_split_is_fixed_disjoint_and_complete(rt_splits):
    # Execute
    again = data.load_rotten_tomatoes()
    # Assert
    assert len(rt_splits["test"]) == 1000 and len(rt_splits["train"]) == 11752
    assert rt_splits["test"]["text"] == again["test"]["text"]
    assert rt_splits["train"]["text"] == again["train"]["text"]
    assert not set(rt_splits["test"]["text"]) & set(rt_splits["train"]["text"])
    assert set(rt_splits["train"].column_names) == {"text", "labels", "movie"}
    # both classes in the held-out split, roughly in the corpus ratio 7403 / 12808 = 0.58
    share = np.mean(rt_splits["test"]["labels"])
    assert 0.5 < share < 0.66


def test_clients_by_movie_hold_whole_movies_and_cover_every_example(rt_splits):
    # Prepare
    train = rt_splits["train"]
    # Execute
    clients = data.split_by_group(train, "movie", 10, seed=0)
    # Assert
    assert sum(len(c) for c in clients) == len(train)
    movies = [set(c["movie"]) for c in clients]
    for i in range(len(movies)):
        for j in range(i + 1, len(movies)):
            assert not movies[i] & movies[j], "a movie must not be split between clients"
    assert set().union(*movies) == set(train["movie"])
    sizes = [len(c) for c in clients]
    assert max(sizes) - min(sizes) <= 40  # greedy balancing; the largest movie has 35 snippets


def test_pseudo_users_are_derived_inside_movies_with_a_heavy_tail(rt_splits):
    # Prepare
    train = rt_splits["train"]
    # Execute
    with_users = data.add_pseudo_users(train, seed=0)
    again = data.add_pseudo_users(train, seed=0)
    # Assert: seeded; every row has a pseudo-user, and each pseudo-user lies inside one movie (so inside one
    # client of the movie split); sizes from 1 up, about the geometric mean of 4 (cut by each movie's size)
    users = with_users[data.PSEUDO_USER_COLUMN]
    assert users == again[data.PSEUDO_USER_COLUMN] and all(users)
    movie_of = {}
    for user, movie in zip(users, with_users["movie"]):
        assert movie_of.setdefault(user, movie) == movie
    sizes = np.array(list(Counter(users).values()))
    assert sizes.min() == 1 and sizes.max() >= 15 and 2.5 < sizes.mean() <= 4.0
    assert with_users.remove_columns(data.PSEUDO_USER_COLUMN)["text"] == train["text"]


# ---------------------------------------------------------------- text and images


class _CharTokenizer:
    """A stand-in tokenizer: one id per character, fixed-length padding."""

    def __call__(self, first, second=None, *, truncation, max_length, padding):
        assert truncation
        texts = first if second is None else [a + "|" + b for a, b in zip(first, second)]
        ids = [[ord(ch) % 50 + 3 for ch in t][:max_length] for t in texts]
        if not padding:
            return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
        return {
            "input_ids": [i + [0] * (max_length - len(i)) for i in ids],
            "attention_mask": [[1] * len(i) + [0] * (max_length - len(i)) for i in ids],
        }


def test_tokenize_keeps_labels_truncates_and_pads_on_request():
    # Prepare
    ds = Dataset.from_dict({"q": ["ab", "abcdefgh"], "s": ["c", "d"], "labels": [1, 0], "idx": [0, 1]})
    # Execute
    padded = data.tokenize(ds, _CharTokenizer(), ("q", "s"), max_seq_length=6, pad_to_max_length=True)
    unpadded = data.tokenize(ds, _CharTokenizer(), ("q", "s"), max_seq_length=6)
    # Assert: "ab|c" has 4 characters, "abcdefgh|d" is truncated to 6
    assert set(padded.column_names) == {"input_ids", "attention_mask", "labels"}
    assert padded["labels"] == [1, 0]
    assert [len(x) for x in padded["input_ids"]] == [6, 6]
    assert padded["attention_mask"][0] == [1, 1, 1, 1, 0, 0]
    assert [len(x) for x in unpadded["input_ids"]] == [4, 6]
    kept = data.tokenize(ds, _CharTokenizer(), ("q", "s"), max_seq_length=6, keep=("idx",))  # e.g. a user column
    assert set(kept.column_names) == {"input_ids", "attention_mask", "labels", "idx"} and kept["idx"] == [0, 1]


def test_limit_is_seeded_and_bounded():
    ds = Dataset.from_dict({"labels": list(range(20))})
    assert len(data.limit(ds, 5)) == 5
    assert data.limit(ds, 5, seed=1)["labels"] == data.limit(ds, 5, seed=1)["labels"]
    assert data.limit(ds, None) is ds and data.limit(ds, 50) is ds


def test_digits_images_are_upsampled_three_channel_with_a_fixed_split():
    # Execute
    splits = data.load_digits_images(image_size=16)
    # Assert
    assert len(splits["train"]) + len(splits["test"]) == 1797
    x = splits["train"][0]["pixel_values"]
    assert tuple(x.shape) == (3, 16, 16)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert x[0, 0, 0] == x[0, 1, 1] == x[2, 0, 0]  # nearest upsampling by 2, channels repeated
    assert data.load_digits_images(image_size=16)["test"]["labels"] == splits["test"]["labels"]


# ---------------------------------------------------------------- metrics


def test_offline_metric_is_an_evaluate_module_with_glue_keys():
    # Prepare: hand-computed values; 4 of 6 right
    preds, refs = [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    # Execute
    mrpc = data.OfflineClassificationMetric(extra=("f1",)).compute(predictions=preds, references=refs)
    cola = data.OfflineClassificationMetric(extra=("matthews_correlation",)).compute(
        predictions=preds, references=refs
    )
    # Assert: f1 = 2 * (2/3 * 2/3) / (4/3) = 2/3; MCC = (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    assert mrpc["accuracy"] == pytest.approx(4 / 6)
    assert mrpc["f1"] == pytest.approx(2 / 3)
    assert cola["matthews_correlation"] == pytest.approx(1 / 3)


def test_compute_metrics_takes_the_argmax_of_the_logits():
    class Pred:
        predictions = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]])
        label_ids = np.array([1, 0, 0])

    fn = data.make_compute_metrics(data.load_metric(None))
    assert fn(Pred()) == {"accuracy": pytest.approx(2 / 3)}


def test_unknown_task_names_the_argument():
    with pytest.raises(ValueError, match="`task_name` must be one of"):
        data.load_glue("stsb_typo")
