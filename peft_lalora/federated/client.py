"""A client's examples (`ClientShard`): read on demand, collated once where the collator allows it, Poisson sampled
per local step (`federated.client_update` runs the steps)."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable

import torch
from transformers import DataCollatorWithPadding, DefaultDataCollator, default_data_collator
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..errors import ConfigError
from ..privacy.sampling import poisson_sample
from ..privacy.secure_random import SecureRandom
from ..privacy.users import sample_users, user_groups

LABEL_KEYS = ("labels", "label", "label_ids")
PADDED_KEYS = ("attention_mask", "token_type_ids", "special_tokens_mask")  # what `tokenizer.pad` pads, with input_ids


def model_columns(model: torch.nn.Module) -> set:
    """The dataset columns a model call accepts (its forward signature) plus the labels."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters) | set(LABEL_KEYS)


class ClientShard:
    """One client's examples: rows `indices` of a `datasets.Dataset` (all rows if None), read on demand, so
    partitioning never copies or re-indexes the data; the dataset is restricted to model columns. Where the
    collator allows it, the dataset is collated once, at the first batch of any shard that shares it (`subset`):
    batches are then its rows gathered by index, bit-identical to collating them (`CollatedRows`).

    With `user_column` (user-level DP, `privacy.users`), the column's ids are read before the non-model columns
    are dropped: `user_ids` (per shard row) and `users` (each user's shard positions); `num_units` is then the
    number of users, the count that Poisson sampling and the accountant use."""

    def __init__(self, dataset, collate: Callable, columns: set, device, indices=None, user_column=None):
        self.user_column = user_column
        self._all_user_ids = _user_ids(dataset, user_column) if user_column is not None else None
        drop = [c for c in dataset.column_names if c not in columns]
        self.dataset = dataset.remove_columns(drop) if drop else dataset
        self.collate = collate
        self.device = device
        # built at the first batch, and shared by the subsets (`copy.copy` keeps this one cached function)
        self._collated = functools.cache(lambda: CollatedRows.build(self.dataset, self.collate))
        self._set_indices(range(len(dataset)) if indices is None else indices)

    def _set_indices(self, indices) -> None:
        self.indices = [int(i) for i in indices]
        self.user_ids, self.users = None, None
        if self._all_user_ids is not None:
            self.user_ids = [self._all_user_ids[i] for i in self.indices]
            self.users = user_groups(self.user_ids, self.user_column)

    def subset(self, indices) -> ClientShard:
        """The shard of rows `indices` of this shard's dataset, sharing its dataset and its collated rows (one
        collation, and one allocation, for all the clients of a dataset)."""
        shard = copy.copy(self)
        shard._set_indices(indices)
        return shard

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_units(self) -> int:
        """The number of privacy units: users under user-level DP, else examples."""
        return len(self.users) if self.users is not None else len(self.indices)

    def sample(self, batch_size: int, sampler: SecureRandom, picker: SecureRandom) -> list:
        """One Poisson batch's shard positions at the expected size `batch_size`: examples at q = B / n, or
        users at q = B / users with one example each (`privacy.users.sample_users`)."""
        rate = batch_size / self.num_units
        if self.users is None:
            return poisson_sample(len(self), rate, sampler).tolist()
        return sample_users(self.users, rate, sampler, picker)

    def batch(self, positions: list) -> dict:
        """Collate the shard's examples at `positions` (0-based within the shard) into model inputs."""
        collated = self._collated()
        if collated:
            rows = torch.tensor([self.indices[p] for p in positions], dtype=torch.long)
            return {k: v.to(self.device) for k, v in collated.take(rows, self.indices[0]).items()}
        if not positions:  # an empty Poisson batch: the right keys and shapes, zero rows
            one = _collate(self.collate, [self.dataset[self.indices[0]]])
            return {k: v[:0].to(self.device) for k, v in one.items()}
        out = _collate(self.collate, _features(self.dataset[[self.indices[p] for p in positions]]))
        return {k: v.to(self.device) for k, v in out.items()}


def _user_ids(dataset, column) -> list:
    """Every row's user id from `dataset[column]`, or a ConfigError naming `user_column`."""
    if not isinstance(column, str) or column not in dataset.column_names:
        raise ConfigError(
            f"`user_column`={column!r} is not a column of the client's data (columns: {dataset.column_names}). "
            "Name the column that holds each example's user, and keep it in the dataset (tokenisation must not "
            "remove it): the trainer drops it before the model sees the batch."
        )
    return list(dataset.with_format(None)[column])


def _collate(collate: Callable, features: list) -> dict:
    """The collator's tensors of `features`, its "label" named "labels" (the Trainer's name)."""
    out = collate(features)
    if "label" in out and "labels" not in out:
        out["labels"] = out.pop("label")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _features(rows: dict) -> list:
    """A `Dataset` read of several rows (a dict of columns) as the list of examples a collator takes."""
    return [dict(zip(rows, values)) for values in zip(*rows.values())]


class CollatedRows:
    """Every row of a dataset collated once, for the collators whose output on a batch follows from their output
    on all rows: transformers' default collator (examples of one shape, stacked row by row) and
    `DataCollatorWithPadding` padding on the right to the longest example with `tokenizer.pad`'s constants. A
    batch is its rows, cut to its longest example when padded: the tensors collating the batch gives, bit for
    bit (tests/test_client_shard.py). Any other collator (or a dataset with a format, None values, or rows that
    padding would more than double) gets None: collate each batch. Built in one piece, `CHUNK_ROWS` rows at a
    time (Python objects of a whole large dataset at once would be a spike of memory); per-client pieces,
    allocated between forward passes, fragmented the heap (peak RSS of 1,000 clients +50 MB)."""

    CHUNK_ROWS = 4096

    def __init__(self, tensors: dict, lengths, padded: frozenset):
        self.tensors, self.lengths, self.padded = tensors, lengths, padded

    @classmethod
    def build(cls, dataset, collate: Callable):
        padded = _padded_columns(collate)
        if padded is None or len(dataset) == 0 or dataset.format["type"] is not None:
            return None
        parts, lengths = [], []
        for start in range(0, len(dataset), cls.CHUNK_ROWS):
            rows = dataset[start : start + cls.CHUNK_ROWS]
            if any(v is None for column in rows.values() for v in column):
                return None
            features = _features(rows)
            try:
                parts.append(_collate(collate, features))
            except (ValueError, TypeError, RuntimeError):  # e.g. examples of several shapes (default collator)
                return None
            if padded:
                lengths += [len(f[collate.tokenizer.model_input_names[0]]) for f in features]
        padded = frozenset(padded) & set(parts[0])
        if padded:
            lengths = torch.tensor(lengths)
            width = int(lengths.max())
            if len(lengths) * width > 2 * int(lengths.sum()):  # mostly padding: not worth its memory
                return None
            fill = _pad_values(collate.tokenizer)
            pad = torch.nn.functional.pad
            parts = [
                {k: pad(v, (0, width - v.shape[1]), value=fill[k]) if k in padded else v for k, v in p.items()}
                for p in parts
            ]
        if any(
            part.keys() != parts[0].keys()
            or any(part[k].dtype != parts[0][k].dtype or part[k].shape[1:] != parts[0][k].shape[1:] for k in part)
            for part in parts
        ):
            return None  # chunks that the collator would not stack into one batch
        tensors = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        return cls(tensors, lengths if padded else None, padded)

    def take(self, rows: torch.Tensor, first: int) -> dict:
        """The batch of dataset rows `rows`; an empty batch has row `first`'s length, as collating it would."""
        out = {k: v.index_select(0, rows) for k, v in self.tensors.items()}
        if self.lengths is not None:
            width = int(self.lengths[rows].max()) if len(rows) else int(self.lengths[first])
            out.update({k: out[k][:, :width].contiguous() for k in self.padded})
        return out


def _pad_values(tokenizer) -> dict:
    """The constant `tokenizer._pad` puts after an example's tokens, per column (transformers' own `_pad`)."""
    return {
        tokenizer.model_input_names[0]: tokenizer.pad_token_id,
        "attention_mask": 0,
        "token_type_ids": tokenizer.pad_token_type_id,
        "special_tokens_mask": 1,
    }


def _padded_columns(collate: Callable):
    """() for transformers' default collator, the columns `tokenizer.pad` pads for a `DataCollatorWithPadding`
    that pads on the right to the longest example with transformers' own `pad`, None for any other."""
    if collate is default_data_collator or (type(collate) is DefaultDataCollator and collate.return_tensors == "pt"):
        return ()
    if type(collate) is not DataCollatorWithPadding:
        return None
    tokenizer = collate.tokenizer
    plain = (
        getattr(type(tokenizer), "pad", None) is PreTrainedTokenizerBase.pad
        and getattr(type(tokenizer), "_pad", None) is PreTrainedTokenizerBase._pad
    )
    if (
        plain
        and collate.padding in (True, "longest")
        and collate.pad_to_multiple_of is None
        and collate.return_tensors == "pt"
        and tokenizer.padding_side == "right"
    ):
        return (tokenizer.model_input_names[0], *PADDED_KEYS)
    return None
