"""The LA-LoRA tuner: config, model, factor schedule, low-pass filter, registration with peft, export."""

from .config import ALTERNATIONS, METHODS, PEFT_TYPE, LALoraConfig
from .export import export_as_lora
from .lowpass import lowpass_filter
from .model import LALoraModel
from .registration import register
from .schedule import trainable_factors

__all__ = [
    "ALTERNATIONS",
    "METHODS",
    "PEFT_TYPE",
    "LALoraConfig",
    "LALoraModel",
    "export_as_lora",
    "lowpass_filter",
    "register",
    "trainable_factors",
]
