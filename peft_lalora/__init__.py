"""peft_lalora: differentially private federated fine-tuning with LA-LoRA, as a peft extension.

Importing this package registers the `LALORA` tuner type with peft, so that `get_peft_model(model,
LALoraConfig(...))` and `PeftModel.from_pretrained(...)` work.
"""

from .errors import (
    AdapterLoadError,
    CheckpointMismatchError,
    ClientDataError,
    ConfigError,
    HubError,
    LALoraError,
    LALoraWarning,
    PolicyError,
    PrivacyBudgetExceededError,
    UnsupportedModelError,
    UntraceableModelError,
)
from .tuner import LALoraConfig, LALoraModel, export_as_lora, lowpass_filter, register, trainable_factors

__version__ = "0.1.0"

register()

_LAZY = {"FederatedDPArguments": "arguments", "FederatedDPTrainer": "trainer"}


def __getattr__(name):  # the Trainer pulls in accelerate: import it only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'peft_lalora' has no attribute {name!r}")


__all__ = [
    "AdapterLoadError",
    "CheckpointMismatchError",
    "ClientDataError",
    "ConfigError",
    "FederatedDPArguments",
    "FederatedDPTrainer",
    "HubError",
    "LALoraConfig",
    "LALoraError",
    "LALoraModel",
    "LALoraWarning",
    "PolicyError",
    "PrivacyBudgetExceededError",
    "UnsupportedModelError",
    "UntraceableModelError",
    "__version__",
    "export_as_lora",
    "lowpass_filter",
    "register",
    "trainable_factors",
]
