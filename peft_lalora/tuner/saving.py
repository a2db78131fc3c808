"""Save one adapter's files at the top of a folder, whatever its name.

peft's `save_pretrained` puts an adapter not named "default" in a subfolder named after it, which
`PeftModel.from_pretrained(base, folder)` and a Hub push of `folder` then do not find.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from ..atomic import atomic_write_bytes

PEFT_CARD = "README.md"  # peft's generic card: the caller writes its own (or none)


def is_lalora_card(text: str) -> bool:
    """Whether a README.md text is an LA-LoRA model card (YAML front matter tagged `lalora`)."""
    if not text.startswith("---"):
        return False
    try:
        meta = yaml.safe_load(text[3:].partition("\n---")[0])
    except yaml.YAMLError:
        return False
    return isinstance(meta, dict) and "lalora" in (meta.get("tags") or [])


def save_adapter_files(
    peft_model, save_directory: str, adapter_name: str, edit_config: Callable[[dict], dict] | None = None
) -> list[str]:
    """
    Write `adapter_config.json` and the weights of adapter `adapter_name` to the top of `save_directory` and
    return the names written. The files are written to a temporary folder inside `save_directory` first (the
    config rewritten by `edit_config` there) and then renamed into place, so a failure leaves nothing
    half-written: each file is written atomically (`atomic.atomic_write_bytes`: fsync, rename, fsync of the
    folder), the weights before the config. peft's generic README.md is not copied.
    """
    os.makedirs(save_directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=save_directory, prefix=".adapter-") as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name])
        src = tmp if adapter_name == "default" else os.path.join(tmp, adapter_name)
        if edit_config is not None:
            config_path = Path(src, "adapter_config.json")
            config = edit_config(json.loads(config_path.read_text(encoding="utf-8")))
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        names = sorted(n for n in os.listdir(src) if n != PEFT_CARD and os.path.isfile(os.path.join(src, n)))
        names.sort(key=lambda n: n == "adapter_config.json")  # the weights first, the config that names them last
        for name in names:  # each file whole or not at all (fsync'ed, renamed), never torn by a crash
            atomic_write_bytes(os.path.join(save_directory, name), Path(src, name).read_bytes())
    return names
