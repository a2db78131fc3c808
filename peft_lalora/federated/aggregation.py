"""Server-side aggregation: pure functions over `{name: tensor}` dicts (adapter factors A, B and the head).

The server averages every tensor on its own (A with A, B with B), never the product B @ A. Sums run in client
order in the tensors' own dtype, so the same inputs always give bit-identical results.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

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
    unknown = sorted(set(local) - set(global_))
    if unknown:
        raise ConfigError(
            f"`local` holds tensors the global adapter does not have: {unknown}. The client must start from the "
            "global adapter's state dict."
        )
    delta = {}
    for name, value in local.items():
        _check_shapes(name, global_[name], value, "the local and the global adapter")
        delta[name] = value.detach() - global_[name].detach().to(value.dtype)
    return delta


def _normalised_weights(weights, num_clients: int) -> list[float]:
    if weights is None:
        return [1.0 / num_clients] * num_clients
    weights = list(weights)
    if len(weights) != num_clients:
        raise ConfigError(
            f"`weights` must have one entry per client delta ({num_clients}), got {len(weights)} entries."
        )
    for i, w in enumerate(weights):
        ok = not isinstance(w, bool) and isinstance(w, numbers.Real) and math.isfinite(w) and w > 0
        if not ok:
            raise ConfigError(
                f"`weights` must be finite numbers > 0 (e.g. client example counts), got {w!r} for client {i}. "
                "Leave a client out of the round instead of giving it weight 0."
            )
    total = math.fsum(float(w) for w in weights)
    return [float(w) / total for w in weights]


def _check_keys(deltas: list[Mapping[str, Tensor]]) -> list[str]:
    names: list[str] = []
    for delta in deltas:
        names.extend(name for name in delta if name not in names)
    for name in names:
        missing = [i for i, delta in enumerate(deltas) if name not in delta]
        if missing:
            raise ConfigError(
                f"`deltas` must all hold the same tensors: `{name}` is missing from client(s) {missing} but sent by "
                "the others. A tensor may be absent only from every client (e.g. A under FFA-LoRA)."
            )
    return names


@torch.no_grad()
def weighted_mean(deltas: list[Mapping[str, Tensor]], weights: list[float] | None = None) -> dict[str, Tensor]:
    """
    FedAvg: the weighted mean of each tensor over the clients, with `weights` normalised to sum to 1
    (`None`: uniform). Each tensor is averaged separately; the result keeps the first client's key order and the
    tensors' dtype.

    Raises `ConfigError` on an empty list, a tensor sent by some clients but not all, mismatched shapes,
    non-positive or non-finite weights, or a non-finite tensor.
    """
    deltas = list(deltas)
    if not deltas:
        raise ConfigError("`deltas` must hold at least one client delta, got an empty list.")
    names = _check_keys(deltas)
    coefficients = _normalised_weights(weights, len(deltas))
    mean = {}
    for name in names:
        first = deltas[0][name]
        if not first.is_floating_point():
            raise ConfigError(f"`{name}` must be a floating-point tensor to be averaged, got dtype {first.dtype}.")
        total = None
        for i, (delta, coefficient) in enumerate(zip(deltas, coefficients)):
            value = delta[name].detach()
            _check_shapes(name, first, value, f"every client (client 0 and client {i})")
            _check_finite(name, value, f"client {i}")
            term = value.to(first.dtype) * coefficient
            total = term if total is None else total + term
        mean[name] = total
    return mean


@torch.no_grad()
def apply_delta(global_: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """
    A new dict `global_ + delta`. Tensors of `global_` absent from `delta` are copied bit-identically; the result
    keeps `global_`'s dtypes. A key of `delta` that `global_` lacks raises `ConfigError`.
    """
    unknown = sorted(set(delta) - set(global_))
    if unknown:
        raise ConfigError(
            f"`delta` holds tensors the global adapter does not have: {unknown}. Aggregate deltas computed "
            "against this global adapter."
        )
    updated = {}
    for name, value in global_.items():
        if name not in delta:
            updated[name] = value.detach().clone()
            continue
        _check_shapes(name, value, delta[name], "the global adapter and the delta")
        _check_finite(name, delta[name], "the delta")
        updated[name] = (value.detach() + delta[name].detach().to(value.dtype)).to(value.dtype)
    return updated
