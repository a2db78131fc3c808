"""One local training step of a client: private (DP-SGD on exact per-sample gradients) or not.

Both steppers take the batch the client's Poisson sampler drew and train whatever tensors currently have
`requires_grad=True` (the schedule sets them with `LALoraModel.set_trainable_factors` before each step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from ..tuner.roles import factor_names
from .grad_sample import select_backend
from .grad_sample_base import model_inputs
from .losses import per_example_loss
from .optimizer import GradientPrivatizer
from .secure_random import SecureRandom


def mixed_precision(model: torch.nn.Module, dtype: Optional[torch.dtype]):
    """Autocast of the forward and backward pass to `dtype` (bf16) on the model's device; a no-op for None."""
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def active_parameters(model: torch.nn.Module) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class PrivateStep:
    """A DP-SGD step: exact per-sample gradients of `model` (on its device) by `backend` (`select_backend`), then
    `GradientPrivatizer` (clip, sum, noise, scale, low-pass, inner step), whose arguments the others are."""

    private = True

    def __init__(
        self,
        model,
        optimizer,
        *,
        noise_multiplier: float,
        per_sample_max_grad_norm: float,
        lowpass_kernel: Optional[tuple] = None,
        backend: str = "auto",
        generator: Optional[SecureRandom] = None,
        loss_fn: Callable = per_example_loss,
        adapter_name: str = "default",
        autocast_dtype: Optional[torch.dtype] = None,
        head_max_grad_norm: Optional[float] = None,
    ):
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.backend = select_backend(model, backend, loss_fn)
        self.dp = GradientPrivatizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            per_sample_max_grad_norm=per_sample_max_grad_norm,
            factor_of=factor_names(model, adapter_name),
            lowpass_kernel=lowpass_kernel,
            generator=generator,
            head_max_grad_norm=head_max_grad_norm,
        )

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.dp.optimizer

    def reset(self, optimizer: torch.optim.Optimizer, generator: Optional[SecureRandom]) -> None:
        """Start a client's local round: a fresh inner optimizer and that client's noise stream."""
        self.dp.optimizer = optimizer
        self.dp.generator = generator

    def __call__(self, batch: dict, expected_batch_size: float) -> dict:
        params = active_parameters(self.model)
        with mixed_precision(self.model, self.autocast_dtype):
            grad_samples, losses = self.backend.compute(batch, params)
        dropped_before = self.dp.dropped_samples
        self.dp.step(grad_samples, params, expected_batch_size)
        finite = losses[torch.isfinite(losses)]
        return {
            "loss": float(finite.mean()) if finite.numel() else float("nan"),
            "batch_size": int(losses.shape[0]),
            "dropped": self.dp.dropped_samples - dropped_before,
        }

    def probe(self, batch: dict) -> None:
        """Per-sample gradients of one batch of the active tensors, discarded (a pre-flight check)."""
        with mixed_precision(self.model, self.autocast_dtype):
            self.backend.compute(batch, active_parameters(self.model))

    def close(self) -> None:
        self.backend.close()


class NonPrivateStep:
    """The non-private baseline: the mean loss of the batch, plain autograd, the same inner optimizer."""

    private = False

    def __init__(
        self,
        model,
        optimizer,
        *,
        loss_fn: Callable = per_example_loss,
        autocast_dtype: Optional[torch.dtype] = None,
        **_unused,
    ):
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.autocast_dtype = autocast_dtype

    def reset(self, optimizer: torch.optim.Optimizer, generator: Optional[SecureRandom] = None) -> None:
        self.optimizer = optimizer

    def _mean_loss(self, batch: dict) -> torch.Tensor:
        with mixed_precision(self.model, self.autocast_dtype):
            losses = self.loss_fn(self.model(**model_inputs(batch)), batch)
        return losses.float().mean()

    def __call__(self, batch: dict, expected_batch_size: float) -> dict:
        size = int(next(iter(batch.values())).shape[0]) if batch else 0
        if size == 0:
            return {"loss": float("nan"), "batch_size": 0}
        loss = self._mean_loss(batch)
        loss.backward()
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "batch_size": size, "dropped": 0}

    def probe(self, batch: dict) -> None:
        """The gradient of one batch of the active tensors, discarded (a pre-flight check)."""
        loss = self._mean_loss(batch)
        if loss.requires_grad:
            loss.backward()
        self.model.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass
