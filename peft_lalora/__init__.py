"""peft_lalora: differentially private federated fine-tuning with LA-LoRA, as a peft extension.

Importing this package registers the `LALORA` tuner type with peft, so that `get_peft_model(model,
LALoraConfig(...))` and `PeftModel.from_pretrained(...)` work.
"""

from .errors import (
    AdapterLoadError,
    CheckpointMismatchError,
    ClientFailedError,
    ConfigError,
    HubError,
    LALoraError,
    LALoraWarning,
    NotRegisteredError,
    PrivacyBudgetExceededError,
    UnsupportedModelError,
)
from .tuner import LALoraConfig, LALoraModel, export_as_lora, lowpass_filter, register, trainable_factors

__version__ = "0.1.0"

register()

__all__ = [
    "AdapterLoadError",
    "CheckpointMismatchError",
    "ClientFailedError",
    "ConfigError",
    "HubError",
    "LALoraConfig",
    "LALoraError",
    "LALoraModel",
    "LALoraWarning",
    "NotRegisteredError",
    "PrivacyBudgetExceededError",
    "UnsupportedModelError",
    "__version__",
    "export_as_lora",
    "lowpass_filter",
    "register",
    "trainable_factors",
]
