"""Export an LA-LoRA adapter as a stock peft `LORA` adapter, for tools that only know peft.

The forward pass of LA-LoRA is plain LoRA, so the weights are the same tensors under the same keys; only
`adapter_config.json` changes (peft_type "LORA", the schedule fields dropped).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

from .config import LALoraConfig

SCHEDULE_FIELDS = tuple(f.name for f in dataclasses.fields(LALoraConfig) if f.name not in
                        {f2.name for f2 in dataclasses.fields(LALoraConfig.__mro__[1])})


def export_as_lora(peft_model, save_directory: str, adapter_name: str = "default") -> str:
    """
    Write adapter `adapter_name` of `peft_model` to `save_directory` as a stock LoRA adapter that
    `PeftModel.from_pretrained` loads without `import peft_lalora`. Returns `save_directory`.
    Files are written to a temporary folder first and moved into place, so a failure leaves nothing half-written.
    """
    os.makedirs(save_directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=".export-") as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name])
        src = tmp if adapter_name == "default" else os.path.join(tmp, adapter_name)
        config_path = os.path.join(src, "adapter_config.json")
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
        for name in SCHEDULE_FIELDS:
            config.pop(name, None)
        config["peft_type"] = "LORA"
        with open(config_path, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
        for name in os.listdir(src):
            if os.path.isfile(os.path.join(src, name)):
                shutil.move(os.path.join(src, name), os.path.join(save_directory, name))
    return save_directory
