"""Check every client's data once before any budget is charged: a failure that every client shares is the
user's error (no `labels`, labels out of range, string labels, sequences longer than the model's positions,
token ids beyond the vocabulary, a backend that cannot trace the model) and is raised; a client that fails on
its own is only reported here and dropped in its rounds.

Nothing here is released or accounted: the check reads the first examples of each shard, runs the model in
eval mode without a gradient, and computes per-sample gradients of one batch, all discarded. No random draw is
made, so the run that follows is unchanged.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ClientDataError
from ..privacy.grad_sample_base import model_inputs
from ..privacy.losses import logits_of, per_example_loss

logger = logging.getLogger(__name__)

PROBE_ROWS = 16


def check_batch_against_config(batch: dict, config) -> None:
    """Raise `ClientDataError` for token ids beyond the vocabulary or sequences longer than the positions."""
    ids = batch.get("input_ids")
    if ids is None or ids.numel() == 0:
        return
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ClientDataError(
            f"`input_ids` hold token id {int(ids.max())} (min {int(ids.min())}), outside the "
            f"model's vocabulary [0, {vocab}): tokenise with the model's own tokenizer."
        )
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and ids.shape[-1] > positions:
        raise ClientDataError(
            f"sequences of length {ids.shape[-1]} exceed the model's `max_position_embeddings` "
            f"= {positions}: truncate them (e.g. `max_length={positions}` in the tokenizer)."
        )


def check_labels(logits: torch.Tensor, batch: dict) -> None:
    """Integer class labels must lie in [0, num_classes) of the logits (CUDA would only assert)."""
    labels = batch["labels"]
    if logits.dim() == 2 and not labels.is_floating_point() and labels.numel():
        classes = logits.shape[-1]
        if int(labels.min()) < 0 or int(labels.max()) >= classes:
            raise ClientDataError(
                f"`labels` hold {sorted({int(v) for v in labels.flatten().tolist()})[:8]}, outside "
                f"[0, {classes}) for a model with {classes} outputs: set `num_labels` or map the "
                "labels to 0..num_labels-1."
            )


@torch.no_grad()
def _forward_check(model, shard) -> None:
    batch = shard.batch(list(range(min(PROBE_ROWS, len(shard)))))
    if "labels" not in batch:
        present = [c for c in ("labels", "label", "label_ids") if c in shard.dataset.column_names]
        if present:
            raise ClientDataError(
                f"the `{present[0]}` column holds values that are not numbers (e.g. "
                f"{shard.dataset[shard.indices[0]][present[0]]!r}): map them to integer class ids "
                "0..num_labels-1 (e.g. `dataset.class_encode_column`)."
            )
        raise ClientDataError(
            f"the batch has no `labels` (keys {sorted(batch)}): the dataset needs a 'labels' "
            "(or 'label') column of targets."
        )
    config = getattr(model, "config", None)
    check_batch_against_config(batch, config)
    logits = logits_of(model(**model_inputs(batch)))
    check_labels(logits, batch)
    per_example_loss(logits, batch)


def preflight(model, shards: list, gradient_probe) -> list:
    """Check every client's first examples; returns the ids of clients that fail on their own (a warning is
    logged for each). Raises `ClientDataError` with the first client's message when every client fails, or when
    `gradient_probe(shard)` (per-sample gradients of one batch) fails on the first client whose data passed."""
    was_training = model.training
    model.eval()
    errors = {}
    try:
        for k, shard in enumerate(shards):
            try:
                _forward_check(model, shard)
            except Exception as exc:  # noqa: BLE001 - classified below: shared by all, or this client's own
                errors[k] = f"{type(exc).__name__}: {exc}"
        if len(errors) == len(shards):
            first = next(iter(errors))
            raise ClientDataError(
                f"Every client's data fails before training, so nothing was trained or charged. "
                f"Client {first}: {errors[first]}"
            )
        healthy = next(k for k in range(len(shards)) if k not in errors)
        try:
            gradient_probe(shards[healthy])
        except Exception as exc:  # noqa: BLE001
            raise ClientDataError(
                f"Per-sample gradients fail on client {healthy}'s data, and would fail on every "
                f"client; nothing was trained or charged: {type(exc).__name__}: {exc}"
            ) from exc
    finally:
        model.train(was_training)
    for k, message in errors.items():
        logger.warning("client %d fails the data check and will be dropped from its rounds: %s", k, message)
    return sorted(errors)
