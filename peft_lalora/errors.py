"""Exceptions and warnings raised by peft_lalora.

Every error a user can trigger derives from `LALoraError`; the ones about bad arguments also derive from
`ValueError` so that code written against peft / transformers conventions keeps catching them.
"""

from __future__ import annotations


class LALoraError(Exception):
    """Base class of every error raised by peft_lalora."""


class ConfigError(LALoraError, ValueError):
    """An argument or configuration field has an invalid value."""


class PolicyError(ConfigError):
    """A run's settings break the data owner's own policy (e.g. a Flower node's `max-epsilon`): refused, nothing
    trained or charged."""


class UnsupportedModelError(LALoraError, ValueError):
    """No exact per-sample-gradient backend exists for a module of the model."""


class UntraceableModelError(UnsupportedModelError):
    """The model's structure stops the gradient before a hooked layer (e.g. a kernel without a backward): found
    while computing per-sample gradients. Its text names modules and settings only, never a value of the data."""


class PrivacyBudgetExceededError(LALoraError):
    """A release would spend more privacy budget than the target allows; nothing was released."""


class AdapterLoadError(LALoraError, ValueError):
    """An adapter on disk does not match its config (missing, extra, mis-shaped or non-finite tensors)."""


class CheckpointMismatchError(LALoraError, ValueError):
    """A checkpoint was written with different privacy-relevant settings than the run resuming it."""


class ClientDataError(LALoraError, ValueError):
    """Every client's data fails the same way (a user error: raised before any budget is charged), or all
    clients of a round failed."""


class HubError(LALoraError):
    """Pushing to or loading from the Hugging Face Hub failed; local artifacts are untouched."""


class LALoraWarning(UserWarning):
    """Warnings emitted by peft_lalora."""
