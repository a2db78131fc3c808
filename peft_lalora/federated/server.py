"""The server's copy of the global adapter: one set of adapter tensors, swapped into the one model by `copy_`
(the model itself is never copied). Aggregation is `aggregation.Aggregator`."""

from __future__ import annotations

import torch

from .client_update import load_state


class GlobalAdapter:
    """The global adapter state: one copy of the adapter tensors, loaded into the model by `copy_`."""

    def __init__(self, model: torch.nn.Module, names: list):
        self.model = model
        params = dict(model.named_parameters())
        self.state = {n: params[n].detach().clone() for n in names}

    def load_into_model(self) -> None:
        load_state(self.model, self.state)
