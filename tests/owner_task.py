"""The toy task of the private trainer's tests, importable by a trainer started as a subprocess
(`task = "owner_task:TASK"`, `python-path` = this folder). Flower-free.

`OWNER_TASK_HANG=1` in the environment: once the node's ledger holds a charge, every batch waits for ever (a trainer
to SIGKILL between its charge and its reply)."""

from __future__ import annotations

import os
import time

from datasets import load_from_disk
from fed_helpers import toy_model
from transformers import default_data_collator

from peft_lalora.owner import TrainingTask


def load_client_data(node_config: dict, run_config: dict) -> tuple:
    ledger = os.path.join(node_config["state-dir"], "ledger.json")

    def collate(rows):
        if os.environ.get("OWNER_TASK_HANG") and os.path.exists(ledger):
            time.sleep(3600)
        return default_data_collator(rows)

    return load_from_disk(node_config["data-path"]), collate


TASK = TrainingTask(
    build_model=lambda rc, nc: toy_model(rc["method"]), load_client_data=load_client_data, config_keys=("method",)
)
