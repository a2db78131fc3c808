"""Per-example losses: one loss value per example, so that per-sample gradients are gradients of these values.

The functions use no data-dependent indexing or Python branching on tensor values, so they also run under
`torch.func.vmap` (one example at a time, with a batch dimension of 1).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..errors import ConfigError

IGNORE_INDEX = -100


def logits_of(outputs) -> torch.Tensor:
    """The logits of a transformers model output (`ModelOutput`, dict, tuple whose first item is the logits, or a tensor)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        logits = outputs[0]
    if logits is None:
        raise ConfigError(
            f"`outputs` must be a model output with a `logits` field (or a logits tensor), got {type(outputs).__name__}. "
            "Call the model without `return_dict=False`, or pass a custom `loss_fn`."
        )
    return logits


def per_example_loss(outputs, batch: Mapping[str, torch.Tensor], *, shift_labels: bool = True) -> torch.Tensor:
    """
    Per-example loss, shape `(B,)`, from a transformers model output and the batch dict (key `"labels"`).

    - classification: logits `(B, C)`, integer labels `(B,)`: cross-entropy;
    - regression: logits `(B, 1)`, float labels `(B,)` or `(B, 1)`: squared error;
    - multi-label: logits `(B, C)`, float labels `(B, C)`: binary cross-entropy averaged over the C labels;
    - causal LM: logits `(B, T, V)`, labels `(B, T)` with `-100` ignored: mean token cross-entropy per example,
      labels shifted by one (`shift_labels=False` for token classification). An example with no counted token
      has loss 0.
    """
    if "labels" not in batch:
        raise ConfigError(
            f"`batch` must hold the targets under the key 'labels', got keys {sorted(batch)}. Add the labels to the batch."
        )
    logits, labels = logits_of(outputs), batch["labels"]
    if logits.dim() == 2:
        return _sequence_level_loss(logits, labels)
    if logits.dim() == 3 and labels.dim() == 2:
        return _token_level_loss(logits, labels, shift_labels)
    raise ConfigError(
        f"`outputs.logits` of shape {tuple(logits.shape)} with `labels` of shape {tuple(labels.shape)} is not a supported "
        "task: expected (B, C) logits with (B,) or (B, C) labels, or (B, T, V) logits with (B, T) labels. Pass a custom `loss_fn`."
    )


def _sequence_level_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    batch_size, num_labels = logits.shape
    if labels.shape[0] != batch_size:
        raise ConfigError(
            f"`labels` must have batch size {batch_size} like the logits, got shape {tuple(labels.shape)}."
        )
    if labels.is_floating_point():
        if num_labels == 1:  # regression
            return (logits.reshape(batch_size) - labels.reshape(batch_size).to(logits.dtype)) ** 2
        if labels.shape == logits.shape:  # multi-label classification
            bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
            return bce.mean(dim=-1)
        raise ConfigError(
            f"float `labels` of shape {tuple(labels.shape)} with {num_labels} logits per example: expected regression "
            "(1 logit) or multi-label targets of the logits' shape. Use integer labels for classification."
        )
    if labels.dim() != 1:
        raise ConfigError(f"integer `labels` for classification must have shape (B,), got {tuple(labels.shape)}.")
    return F.cross_entropy(logits, labels.long(), reduction="none")


def _token_level_loss(logits: torch.Tensor, labels: torch.Tensor, shift_labels: bool) -> torch.Tensor:
    if labels.shape != logits.shape[:2]:
        raise ConfigError(
            f"`labels` must have shape (B, T) = {tuple(logits.shape[:2])} like the logits, got {tuple(labels.shape)}."
        )
    if shift_labels:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    labels = labels.long()
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    counted = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1).to(token_loss.dtype)
    return token_loss.sum(dim=1) / counted
