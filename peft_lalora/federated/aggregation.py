"""Server-side aggregation over `{name: tensor}` dicts (adapter factors A, B and the head): `Aggregator`, which
both engines use, and the checked delta arithmetic."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Optional

import torch
from torch import Tensor

from ..errors import ConfigError


def _check_finite(name: str, tensor: Tensor, where: str) -> None:
    if tensor.is_floating_point() or tensor.is_complex():
        if not bool(torch.isfinite(tensor).all()):
            raise ConfigError(
                f"`{name}` from {where} holds non-finite values (NaN or inf); aggregating it would corrupt the "
                "global adapter. Drop or fix that client's update."
            )


def _check_known(argument: str, tensors: Mapping, global_: Mapping, fix: str) -> None:
    unknown = sorted(set(tensors) - set(global_))
    if unknown:
        raise ConfigError(f"`{argument}` holds tensors the global adapter does not have: {unknown}. {fix}")


def _check_shapes(name: str, first: Tensor, other: Tensor, what: str) -> None:
    if first.shape != other.shape:
        raise ConfigError(
            f"`{name}` must have the same shape in {what}, got {tuple(first.shape)} and {tuple(other.shape)}. "
            "All clients must share one adapter config (r, target modules)."
        )


@torch.no_grad()
def adapter_delta(local: Mapping[str, Tensor], global_: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """
    `local - global_` for every tensor the client sends (the keys of `local`).

    Keys of `global_` missing from `local` are simply not part of the delta (FFA-LoRA never sends A).
    """
    _check_known("local", local, global_, "The client must start from the global adapter's state dict.")
    delta = {}
    for name, value in local.items():
        _check_shapes(name, global_[name], value, "the local and the global adapter")
        delta[name] = value.detach() - global_[name].detach().to(value.dtype)
    return delta


def check_delta(delta: Mapping[str, Tensor], global_state: Mapping[str, Tensor], weight, client) -> float:
    """A client's delta checked before anything of it is aggregated (only tensors of the global adapter, with its
    shapes, finite values) and its weight (a finite number > 0, returned as a float)."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 < weight < math.inf:
        raise ConfigError(
            f"`weight` must be a finite number > 0 (e.g. 1.0 or the client's example count), got {weight!r} for "
            f"client {client}. Leave a client out of the round instead of giving it weight 0."
        )
    _check_known("delta", delta, global_state, "A client must send deltas of the global adapter's tensors.")
    for name, value in delta.items():
        _check_shapes(name, global_state[name], value, "the global adapter and the delta")
        _check_finite(name, value, f"client {client}")
    return float(weight)


class Aggregator:
    """
    The server side of a round: the weighted sum of the clients' deltas, tensor by tensor (A with A, B with B,
    never the product), then `merged()`, the new global adapter. A tensor nobody sent (FFA-LoRA's A, RoLoRA's
    idle factor) keeps its global value; a tensor is averaged over the clients that sent it. Sums run in client
    order in the tensors' dtype (bit-identical for the same inputs); the weights are summed in float64.

    Every delta is checked: only tensors of the global adapter, with its shapes, finite values, a positive weight.
    Memory: one adapter, whatever the number of clients. Under Accelerate each process adds its share of the
    clients and `reduce(fn)` sums the partial sums across processes.
    """

    def __init__(self, global_state: Mapping[str, Tensor]):
        self.global_state = dict(global_state)
        self.names = list(self.global_state)
        self.sums = {n: torch.zeros_like(t) for n, t in self.global_state.items()}
        self.counts = dict.fromkeys(self.names, 0.0)  # total weight per tensor, float64
        self.survivors = 0

    @torch.no_grad()
    def add(self, delta: Mapping[str, Tensor], weight: float = 1.0) -> None:
        weight = check_delta(delta, self.sums, weight, self.survivors)
        for name, value in delta.items():
            self.sums[name].add_(value, alpha=weight)
            self.counts[name] += weight
        self.survivors += 1

    def reduce(self, reduce_fn: Optional[Callable] = None) -> None:
        """Sum the partial sums of every process (`reduce_fn` sums a tensor across processes)."""
        if reduce_fn is None:
            return
        flat = reduce_fn(torch.cat([self.sums[n].reshape(-1) for n in self.names]))  # one collective call
        parts = flat.split([self.sums[n].numel() for n in self.names])
        self.sums = {n: part.view_as(self.sums[n]).clone() for n, part in zip(self.names, parts)}
        tail = [self.counts[n] for n in self.names] + [float(self.survivors)]
        tail = reduce_fn(torch.tensor(tail, dtype=torch.float64, device=flat.device)).tolist()
        self.counts = {n: float(c) for n, c in zip(self.names, tail[:-1])}
        self.survivors = int(round(tail[-1]))

    def mean(self) -> dict:
        """The weighted mean delta of every tensor some client sent (tensors nobody sent are left out)."""
        if self.survivors == 0:
            raise ConfigError("No client delta was added: a round needs at least one surviving client to aggregate.")
        return {n: self.sums[n] / self.counts[n] for n in self.names if self.counts[n] > 0}

    def merged(self) -> dict:
        """The new global adapter: the global state plus the mean delta (tensors nobody sent unchanged)."""
        return apply_delta(self.global_state, self.mean())


@torch.no_grad()
def apply_delta(global_: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """
    A new dict `global_ + delta`. Tensors of `global_` absent from `delta` are copied bit-identically; the result
    keeps `global_`'s dtypes. A key of `delta` that `global_` lacks raises `ConfigError`.
    """
    _check_known("delta", delta, global_, "Aggregate deltas computed against this global adapter.")
    updated = {}
    for name, value in global_.items():
        if name not in delta:
            updated[name] = value.detach().clone()
            continue
        _check_shapes(name, value, delta[name], "the global adapter and the delta")
        _check_finite(name, delta[name], "the delta")
        updated[name] = (value.detach() + delta[name].detach().to(value.dtype)).to(value.dtype)
    return updated
