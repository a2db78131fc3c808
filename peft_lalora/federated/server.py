"""The server side of a round: the global adapter, held as tensors and swapped into the one model, and the
sum of the clients' weighted deltas (reduced across processes under Accelerate)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from .aggregation import adapter_delta, apply_delta


def adapter_tensor_names(model: torch.nn.Module, adapter_name: str = "default") -> list:
    """The tensors the federation trains and exchanges: LoRA A and B of `adapter_name` and the trainable head
    (`modules_to_save`), as named by `model.named_parameters()`."""
    names = []
    for name, _ in model.named_parameters():
        if f".lora_A.{adapter_name}." in name or f".lora_B.{adapter_name}." in name \
                or f".modules_to_save.{adapter_name}." in name:
            names.append(name)
    return names


class GlobalAdapter:
    """The global adapter state: one copy of the adapter tensors, loaded into the model by `copy_` (the model
    itself is never copied)."""

    def __init__(self, model: torch.nn.Module, names: list):
        self.model = model
        self.names = list(names)
        params = dict(model.named_parameters())
        self.state = {n: params[n].detach().clone() for n in self.names}

    @torch.no_grad()
    def load_into_model(self) -> None:
        params = dict(self.model.named_parameters())
        for name, value in self.state.items():
            params[name].copy_(value)

    @torch.no_grad()
    def client_delta(self, sent: list) -> dict:
        """The delta of the tensors in `sent` between the model (after local training) and the global state."""
        params = dict(self.model.named_parameters())
        return adapter_delta({n: params[n].detach() for n in sent}, {n: self.state[n] for n in sent})

    def apply(self, mean_delta: dict) -> None:
        self.state = apply_delta(self.state, mean_delta)


class RoundSum:
    """Running sum of w_k * delta_k over the round's surviving clients, in client order. Memory: one adapter
    (plus one per tensor set the clients send), whatever the number of clients."""

    def __init__(self, names: list, like: dict):
        self.names = list(names)
        self.sums = {n: torch.zeros_like(like[n]) for n in self.names}
        self.counts = {n: 0.0 for n in self.names}  # total weight per tensor (FFA-LoRA never sends A)
        self.survivors = 0

    def add(self, delta: dict, weight: float) -> None:
        for name, value in delta.items():
            self.sums[name].add_(value, alpha=weight)
            self.counts[name] += weight
        self.survivors += 1

    def reduce(self, reduce_fn: Optional[Callable] = None) -> None:
        """Sum the partial sums of every process (`reduce_fn` sums a tensor across processes)."""
        if reduce_fn is None:
            return
        flat = torch.cat([self.sums[n].reshape(-1) for n in self.names]
                         + [torch.tensor([self.counts[n] for n in self.names] + [float(self.survivors)],
                                         dtype=self.sums[self.names[0]].dtype, device=self.sums[self.names[0]].device)])
        flat = reduce_fn(flat)
        offset = 0
        for name in self.names:
            size = self.sums[name].numel()
            self.sums[name] = flat[offset:offset + size].view_as(self.sums[name]).clone()
            offset += size
        tail = flat[offset:].tolist()
        self.counts = {n: float(c) for n, c in zip(self.names, tail[:-1])}
        self.survivors = int(round(tail[-1]))

    def mean(self) -> dict:
        """The weighted mean delta of every tensor some client sent (tensors nobody sent are left out)."""
        return {n: self.sums[n] / self.counts[n] for n in self.names if self.counts[n] > 0}
