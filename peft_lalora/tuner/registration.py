"""Register the `LALORA` tuner type with peft, without touching peft's source.

peft's `register_peft_method` only accepts names of its closed `PeftType` enum, so the string key `"LALORA"`
goes straight into the three lookup tables of `peft.mapping`. Doing it twice changes nothing.
"""

from __future__ import annotations

import peft.mapping as peft_mapping

from .config import PEFT_TYPE, LALoraConfig
from .model import LALoraModel


def register() -> None:
    """Make `get_peft_model`, `PeftModel.from_pretrained` and friends know the `LALORA` tuner type (idempotent)."""
    peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = LALoraConfig
    peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = LALoraModel
    peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = LALoraModel.prefix
