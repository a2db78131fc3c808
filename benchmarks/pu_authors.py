"""The authors' released mechanism, for `privacy_utility.py --mechanism authors` only. NOT differentially private.

What it does, per local step (the authors' released code as the project's method notes describe it; the paper's
text describes per-example DP-SGD, which is what the library implements):
  1. the mean loss of the batch, one backward pass: the batch-mean gradient g_t of every active tensor t
     (no per-example gradients);
  2. a data-dependent clip norm C = min(median over tensors of ||g_t||, 0.4), and each g_t clipped to C
     (per tensor, not per example: one example can move the update without bound, hence no DP guarantee);
  3. noise N(0, (sigma * C / batch)^2) added to each tensor, with the sigma of the DP run at the same epsilon;
  4. the normal optimizer step on the noisy gradient;
  5. LA-LoRA (with filter) only: an extra SGD step, at the factor's own learning rate, along the FFT Laplacian
     smoothing of the same noisy gradient (Osher et al.'s LS-SGD, (I - s * Laplacian)^-1 with periodic boundary,
     s = `LS_STRENGTH`), A along d_in, B along d_out: the filter is added on top of the step, not instead of it,
     which roughly doubles the step size;
LA-LoRA's B trains at twice the learning rate (`lora_b_lr_ratio=2` in `privacy_utility.py`), and in the authors'
protocol one learning rate serves every method (`--lr-protocol shared`).
"""

from __future__ import annotations

import math

import torch

from peft_lalora.privacy.engine import active_parameters
from peft_lalora.privacy.grad_sample_base import model_inputs
from peft_lalora.privacy.losses import per_example_loss
from peft_lalora.tuner.roles import tensor_role

MAX_CLIP = 0.4  # the authors' cap on the data-dependent clip norm
LS_STRENGTH = 1.0  # s of the Laplacian smoothing (LS-SGD's default)


def laplacian_smoothing(grad: torch.Tensor, dim: int, strength: float = LS_STRENGTH) -> torch.Tensor:
    """(I - s L)^-1 grad along `dim`, L the 1-D periodic Laplacian, solved in Fourier space: each frequency k of
    a length-d signal is divided by 1 + 2 s (1 - cos(2 pi k / d))."""
    d = grad.shape[dim]
    k = torch.arange(d, dtype=torch.float64, device=grad.device)
    denom = (1 + 2 * strength * (1 - torch.cos(2 * math.pi * k / d))).to(torch.float32)
    shape = [1] * grad.dim()
    shape[dim] = d
    spectrum = torch.fft.fft(grad.float(), dim=dim) / denom.view(shape)
    return torch.fft.ifft(spectrum, dim=dim).real.to(grad.dtype)


class AuthorsStep:
    """A stepper with the interface of the library's `NonPrivateStep` (reset / __call__ / probe / close) that runs
    the authors' mechanism above with noise multiplier `sigma`; `extra_filter_step` for LA-LoRA with filter."""

    private = True  # an empty Poisson batch still takes a (noise-only) step, as in the DP runs

    def __init__(self, model, *, sigma: float, extra_filter_step: bool, adapter_name: str = "default"):
        self.model, self.sigma, self.extra_filter_step = model, float(sigma), extra_filter_step
        self.adapter_name = adapter_name
        self.optimizer, self.generator = None, None
        self.clip_norms = []  # the data-dependent C of every step (reported by the benchmark)

    def reset(self, optimizer, generator=None) -> None:
        self.optimizer, self.generator = optimizer, generator

    def _gradients(self, batch: dict, params: dict) -> tuple:
        size = int(next(iter(batch.values())).shape[0]) if batch else 0
        if size == 0:
            return {n: torch.zeros_like(p) for n, p in params.items()}, float("nan"), 0
        losses = per_example_loss(self.model(**model_inputs(batch)), batch)
        loss = losses.float().mean()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        return (
            {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(params.items(), grads)},
            float(loss.detach()),
            size,
        )

    def __call__(self, batch: dict, expected_batch_size: float) -> dict:
        params = active_parameters(self.model)
        grads, loss, size = self._gradients(batch, params)
        norms = torch.stack([g.float().norm() for g in grads.values()])
        clip = min(float(norms.median()), MAX_CLIP)
        self.clip_norms.append(clip)
        std = self.sigma * clip / expected_batch_size
        lrs = {id(p): group["lr"] for group in self.optimizer.param_groups for p in group["params"]}
        for (name, p), g in zip(params.items(), grads.values()):
            scale = min(1.0, clip / (float(g.float().norm()) + 1e-12))
            noise = torch.normal(0.0, std, size=g.shape, generator=self.generator, device=g.device)
            p.grad = (g * scale + noise.to(g.dtype)).detach()
        self.optimizer.step()
        with torch.no_grad():
            for name, p in params.items():
                role = tensor_role(name, self.adapter_name)
                if self.extra_filter_step and role in ("A", "B"):  # A (r x d_in) along d_in, B (d_out x r) along d_out
                    p.add_(laplacian_smoothing(p.grad, dim=1 if role == "A" else 0), alpha=-lrs[id(p)])
                p.grad = None
        return {"loss": loss, "batch_size": size, "dropped": 0}

    def probe(self, batch: dict) -> None:
        params = active_parameters(self.model)
        self._gradients(batch, params)

    def close(self) -> None:
        pass
