"""Check every client's data once before any budget is charged: a failure that every client shares is the
user's error (no `labels`, labels out of range, string labels, sequences longer than the model's positions,
token ids beyond the vocabulary, a backend that cannot trace the model) and is raised; a client that fails on
its own is only reported here and dropped in its rounds.

Every row of every shard is read (in chunks of `SCAN_ROWS`, without the model): batches collate, labels are
present and numeric, token ids lie in the vocabulary and sequences fit the model's positions; integer labels
are then checked against the number of outputs of the model, which runs on the first `PROBE_ROWS` examples.
An example that would fail only when Poisson sampling draws it is thus caught here, before anything is charged,
not in the rounds (where its failure would be released whenever it is drawn).

The messages name the rule, the model's public limit and the fix, never a value computed from the examples
(a length, a token id, a label, a batch size, a row). Nothing here is released or accounted: the model runs in
eval mode without a gradient and the per-sample gradients of one batch are discarded. No random draw is made,
so the run that follows is unchanged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ClientDataError, UnsupportedModelError
from ..privacy.grad_sample_base import model_inputs
from ..privacy.losses import IGNORE_INDEX, logits_of, per_example_loss
from .client import LABEL_KEYS
from .disclosure import error_text

logger = logging.getLogger(__name__)

PROBE_ROWS = 16  # the examples the model (and the per-sample gradients) run on
SCAN_ROWS = 1024  # the rows collated at a time by the pass over a whole shard


@dataclass(frozen=True)
class InputLimits:
    """The model's public limits on its inputs (None: no limit known)."""

    vocab_size: Optional[int] = None
    type_vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    max_length: Optional[int] = None  # the longest sequence: max_position_embeddings less any padding offset
    position_padding_idx: Optional[int] = None  # positions count only the tokens that are not this (RoBERTa)

    @classmethod
    def of(cls, model) -> InputLimits:
        config = getattr(model, "config", None)
        positions = getattr(config, "max_position_embeddings", None)
        padding_idx, max_length = None, positions
        for name, module in model.named_modules():  # RoBERTa-style positions start after the padding index
            if name.endswith("embeddings.position_embeddings") and isinstance(module, torch.nn.Embedding):
                if module.padding_idx is not None:
                    padding_idx = int(module.padding_idx)
                    max_length = module.num_embeddings - padding_idx - 1
                break
        return cls(
            vocab_size=getattr(config, "vocab_size", None),
            type_vocab_size=getattr(config, "type_vocab_size", None),
            max_position_embeddings=positions,
            max_length=max_length,
            position_padding_idx=padding_idx,
        )


def check_batch_against_config(batch: dict, limits: InputLimits) -> None:
    """Raise `ClientDataError` for token ids beyond the vocabulary or sequences longer than the positions."""
    ids = batch.get("input_ids")
    if ids is None or ids.numel() == 0:
        return
    vocab = limits.vocab_size
    if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ClientDataError(
            f"`input_ids` hold token ids outside the model's vocabulary [0, {vocab}) (`vocab_size`={vocab}): "
            "tokenise with the model's own tokenizer."
        )
    types = batch.get("token_type_ids")
    if limits.type_vocab_size is not None and types is not None and types.numel():
        if int(types.max()) >= limits.type_vocab_size or int(types.min()) < 0:
            raise ClientDataError(
                f"`token_type_ids` hold values outside [0, {limits.type_vocab_size}) (`type_vocab_size`="
                f"{limits.type_vocab_size}): tokenise with the model's own tokenizer, or drop the column."
            )
    if limits.max_length is None:
        return
    padding = limits.position_padding_idx
    longest = ids.shape[-1] if padding is None else int((ids != padding).sum(-1).max())
    if longest > limits.max_length:
        offset = "" if padding is None else " less the padding offset of its positions"
        raise ClientDataError(
            f"some sequences are longer than the model's {limits.max_length} positions (`max_position_embeddings`="
            f"{limits.max_position_embeddings}{offset}): truncate every example (e.g. `truncation=True, "
            f"max_length={limits.max_length}` in the tokenizer)."
        )


class LabelRange:
    """The smallest and largest integer label of a shard: of every label (`every`) and of those that are not the
    ignored index -100 (`counted`); (inf, -inf) while there is none."""

    def __init__(self):
        self.floating = False
        self.every = self.counted = (math.inf, -math.inf)

    def update(self, labels: torch.Tensor) -> None:
        if labels.is_floating_point():
            self.floating = True
        else:
            self.every = _merge(self.every, labels)
            self.counted = _merge(self.counted, labels[labels != IGNORE_INDEX])


def _merge(bounds: tuple, values: torch.Tensor) -> tuple:
    return (min(bounds[0], int(values.min())), max(bounds[1], int(values.max()))) if values.numel() else bounds


def check_labels(logits: torch.Tensor, labels: LabelRange) -> None:
    """Integer class labels must lie in [0, num_classes) of the logits, token labels in [0, vocabulary) or be
    -100 (CUDA would only assert)."""
    if labels.floating or logits.dim() not in (2, 3):
        return
    n = logits.shape[-1]
    low, high = labels.every if logits.dim() == 2 else labels.counted
    if low < 0 or high >= n:  # never for (inf, -inf): no label to check
        raise ClientDataError(
            f"`labels` hold class ids outside [0, {n}) for a model with {n} outputs (`num_labels`={n}): set "
            "`num_labels` or map the labels to 0..num_labels-1."
            if logits.dim() == 2
            else f"`labels` hold token ids outside [0, {n}) (the model's {n} outputs) other than {IGNORE_INDEX} "
            "(ignored): build the labels from the model's own tokenizer."
        )


def _require_labels(batch: dict, shard) -> None:
    if "labels" in batch:
        return
    present = [c for c in LABEL_KEYS if c in shard.dataset.column_names]
    if present:
        raise ClientDataError(
            f"the `{present[0]}` column holds values that are not numbers: map them to integer class ids "
            "0..num_labels-1 (e.g. `dataset.class_encode_column`)."
        )
    raise ClientDataError(
        f"the batch has no `labels` (keys {sorted(batch)}): the dataset needs a 'labels' (or 'label') column of "
        "targets."
    )


def scan_shard(shard, limits: InputLimits) -> LabelRange:
    """Read every row of `shard`, `SCAN_ROWS` at a time: raise `ClientDataError` when rows do not collate, lack
    numeric labels, or break the model's input limits; returns the range of the labels."""
    labels = LabelRange()
    for start in range(0, len(shard), SCAN_ROWS):
        try:
            batch = shard.batch(list(range(start, min(start + SCAN_ROWS, len(shard)))))
        except Exception as exc:  # noqa: BLE001 - the collator's text may quote the examples
            raise ClientDataError(
                f"the examples do not collate into batches ({type(exc).__name__} from the data collator): give "
                "every example the same columns with no missing values, and pass a `data_collator` that pads "
                "examples of several lengths (e.g. `DataCollatorWithPadding`)."
            ) from None
        _require_labels(batch, shard)
        check_batch_against_config(batch, limits)
        labels.update(batch["labels"])
    return labels


@torch.no_grad()
def check_client(model, shard, limits: InputLimits) -> None:
    """Every row of the shard (`scan_shard`), then the model's forward pass and loss on its first rows."""
    labels = scan_shard(shard, limits)
    batch = shard.batch(list(range(min(PROBE_ROWS, len(shard)))))
    logits = logits_of(model(**model_inputs(batch)))
    check_labels(logits, labels)
    per_example_loss(logits, batch)


def preflight(model, shards: list, stepper, round_idx: int, *, reveal_errors: bool = False) -> list:
    """Check every client's data; returns the ids of clients that fail on their own (a warning is logged for
    each). Raises `ClientDataError` with the first client's message when every client fails, or when the
    `stepper`'s per-sample gradients of the first `PROBE_ROWS` rows (in the phase of round `round_idx`'s first
    local step, discarded) fail on the first client whose data passed.
    The text of an error raised by the model, the loss or the backend is withheld unless `reveal_errors`
    (`disclosure.error_text`): it may quote a length or a batch size."""
    was_training = model.training
    model.eval()
    errors = {}
    limits = InputLimits.of(model)
    where = "in the model's forward pass or loss on the client's first examples"
    try:
        for k, shard in enumerate(shards):
            try:
                check_client(model, shard, limits)
            except Exception as exc:  # noqa: BLE001 - classified below: shared by all, or this client's own
                errors[k] = error_text(exc, reveal=reveal_errors, where=where)
        if len(errors) == len(shards):
            first = next(iter(errors))
            raise ClientDataError(
                f"Every client's data fails before training, so nothing was trained or charged. "
                f"Client {first}: {errors[first]}"
            )
        healthy = next(k for k in range(len(shards)) if k not in errors)
        try:
            model.base_model.set_trainable_factors(model.base_model.trainable_factors(round_idx, 0))
            stepper.probe(shards[healthy].batch(list(range(min(PROBE_ROWS, len(shards[healthy]))))))
        except Exception as exc:  # noqa: BLE001
            text = error_text(exc, reveal=reveal_errors, where="from the per-sample gradient backend")
            if isinstance(exc, UnsupportedModelError):  # the model, not the data: say so, with the module it names
                raise UnsupportedModelError(
                    f"Per-sample gradients cannot be computed for this model, whatever the data; nothing was "
                    f"trained or charged: {text}"
                ) from (exc if reveal_errors else None)
            raise ClientDataError(
                f"Per-sample gradients fail on client {healthy}'s first examples, and would fail on every "
                f"client; nothing was trained or charged: {text}. If the backend cannot trace this model, "
                "try the other `per_sample_grad_backend` ('hooks' or 'func')."
            ) from (exc if reveal_errors else None)
    finally:
        model.train(was_training)
    for k, message in errors.items():
        logger.warning("client %d fails the data check and will be dropped from its rounds: %s", k, message)
    return sorted(errors)
