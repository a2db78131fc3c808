"""Export an LA-LoRA adapter as a stock peft `LORA` adapter, for tools that only know peft.

The forward pass of LA-LoRA is plain LoRA, so the weights are the same tensors under the same keys; only
`adapter_config.json` changes (peft_type "LORA", the schedule fields dropped).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..errors import ConfigError
from .config import LALoraConfig
from .saving import is_lalora_card, save_adapter_files

SCHEDULE_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(LALoraConfig)
    if f.name not in {f2.name for f2 in dataclasses.fields(LALoraConfig.__mro__[1])}
)


def export_as_lora(peft_model, save_directory: str, adapter_name: str = "default") -> str:
    """
    Write adapter `adapter_name` of `peft_model` to `save_directory` as a stock LoRA adapter that
    `PeftModel.from_pretrained` loads without `import peft_lalora`. Returns `save_directory`.
    Files are written to a temporary folder first and moved into place, so a failure leaves nothing half-written.
    A folder holding an LA-LoRA adapter or its privacy card (what `FederatedDPTrainer.save_model` writes) is
    refused: the export would replace its model card and adapter config.
    """
    _refuse_lalora_folder(save_directory)

    def to_lora(config: dict) -> dict:
        for name in SCHEDULE_FIELDS:
            config.pop(name, None)
        config["peft_type"] = "LORA"
        return config

    save_adapter_files(peft_model, save_directory, adapter_name, edit_config=to_lora)
    return save_directory


def _refuse_lalora_folder(save_directory: str) -> None:
    found = []
    config_path = Path(save_directory, "adapter_config.json")
    if config_path.is_file():
        try:
            peft_type = json.loads(config_path.read_text(encoding="utf-8")).get("peft_type")
        except (ValueError, AttributeError):
            peft_type = None
        if peft_type != "LORA":
            found.append(f"adapter_config.json with peft_type {peft_type!r}")
    if os.path.isfile(os.path.join(save_directory, "privacy_report.json")):
        found.append("privacy_report.json")
    readme = Path(save_directory, "README.md")
    if readme.is_file() and is_lalora_card(readme.read_text(encoding="utf-8", errors="replace")):
        found.append("README.md (an LA-LoRA model card)")
    if found:
        suggestion = os.path.normpath(save_directory) + "-lora"
        raise ConfigError(
            f"`save_directory` {save_directory!r} holds an LA-LoRA adapter or its privacy card ({'; '.join(found)}): "
            "a stock LoRA export there would replace the privacy card (README.md) and adapter_config.json. Export "
            f"to another folder, e.g. {suggestion!r}."
        )
