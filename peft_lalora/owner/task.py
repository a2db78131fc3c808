"""What a federated job needs from its user: how to build the model (the same on every machine) and how a client
(a Flower ClientApp, or the data owner's private trainer) loads its own data. Flower-free."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..tuner.model import LALoraModel


@dataclass(frozen=True)
class TrainingTask:
    """
    Args:
        build_model (`Callable[[dict, dict], PeftModel]`): `(run_config, node_config) -> get_peft_model(base,
            LALoraConfig(...))`. Called by the server (the initial global adapter, the saved adapter; its
            node_config is usually empty) and by every client (e.g. `node_config["model-path"]`: where this machine
            keeps the base model), so the frozen base weights must be the same everywhere (a pretrained checkpoint,
            or a model built from the public seed).
        load_client_data (`Callable[[dict, dict], tuple]`): `(node_config, run_config) -> (dataset, collate)`: the
            client's `datasets.Dataset` (model inputs and `labels`) and its collate function, read from the
            SuperNode's own disk (e.g. `node_config["data-path"]`). Only the client process calls it.
        config_keys (`tuple[str, ...]`): the run-config keys the two functions read (any other unknown key is
            refused, see `run_config.check_keys`).
        save_extras (`Callable[[str, dict], None]`, *optional*): `(output_dir, run_config)`: writes what a user of
            the saved adapter needs besides it (a tokenizer, pooling statistics). Called by the server.
    """

    build_model: Callable[[dict, dict], Any]
    load_client_data: Callable[[dict, dict], tuple]
    config_keys: tuple = field(default=())
    save_extras: Callable[[str, dict], None] | None = None

    def model(self, run_config: dict, node_config: dict):
        model = self.build_model(dict(run_config), dict(node_config))
        if not isinstance(getattr(model, "base_model", None), LALoraModel):
            raise ConfigError(
                "`build_model` must return `get_peft_model(base, LALoraConfig(...))` (after `import "
                f"peft_lalora`), got {type(model).__name__}."
            )
        return model

    def client_data(self, node_config: dict, run_config: dict) -> tuple:
        out = self.load_client_data(dict(node_config), dict(run_config))
        if not (isinstance(out, tuple) and len(out) == 2 and callable(out[1])):
            raise ConfigError(
                "`load_client_data` must return `(dataset, collate)` (a `datasets.Dataset` and a "
                f"collate function), got {type(out).__name__}."
            )
        return out
