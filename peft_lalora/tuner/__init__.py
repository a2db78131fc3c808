"""The LA-LoRA tuner: the methods table, config, model, factor schedule, low-pass filter, registration with peft,
export."""

from .config import PEFT_TYPE, LALoraConfig
from .export import export_as_lora
from .lowpass import lowpass_filter
from .methods import ALTERNATIONS, METHODS, Method, method_of
from .model import LALoraModel
from .registration import register
from .schedule import trainable_factors

__all__ = [
    "ALTERNATIONS",
    "METHODS",
    "PEFT_TYPE",
    "LALoraConfig",
    "LALoraModel",
    "Method",
    "export_as_lora",
    "lowpass_filter",
    "method_of",
    "register",
    "trainable_factors",
]
