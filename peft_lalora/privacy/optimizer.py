"""The DP-SGD step of LA-LoRA (`GradientPrivatizer`), in named stages, wrapping any torch optimizer.

    clip      per-sample, the joint L2 norm of the active tensors to a fixed C; a non-finite per-sample gradient
              is dropped (counted), never averaged in
    sum       over the examples of the (Poisson) batch
    noise     + N(0, (sigma * C)^2) per coordinate, in at least float32 (clipping groups: C = sqrt(C_lora^2 + C_head^2))
    scale     / expected batch size (q * n_k: the realised size would leak)
    lowpass   Gaussian low-pass filter on the active LoRA factor (post-processing: no privacy cost)
    inner     the wrapped optimizer's step; inactive tensors have `.grad = None` and never move

Not an opacus `DPOptimizer`, though clip, noise and scale are opacus 1.6's formulas (factor min(1, C / (||g_i|| +
1e-6)), std sigma * C, division by the expected batch size): opacus reads `p.grad_sample` from its own hooks (this
takes a dict from either backend), sums bfloat16 gradients in bfloat16, lets one non-finite example poison the sum,
has no {LoRA factors, head} clipping groups, and its only stage after the noise (`step_hook`) is its accountant's.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ..checks import check_number, check_positive
from ..errors import ConfigError, LALoraWarning
from ..tuner.lowpass import lowpass_filter
from .secure_random import SecureRandom


class GradientPrivatizer:
    """
    Privatises the per-sample gradients of the active tensors (clip, sum, noise, scale, low-pass), then runs the
    wrapped optimizer's step on them.

    Args:
        optimizer (`torch.optim.Optimizer`): the inner optimizer over all adapter tensors (A, B, head).
        noise_multiplier (`float`): sigma; 0.0 only when asked for explicitly (epsilon = inf).
        per_sample_max_grad_norm (`float`): the fixed clip norm C.
        factor_of (`dict[str, str]`): parameter name -> "A" / "B" for LoRA weights (others: head).
        lowpass_kernel (`tuple`, *optional*): kernel of the low-pass stage; None disables it.
        generator (`SecureRandom`, *optional*): the noise stream keyed by the private root; None: a fresh one from
            the OS's entropy (a `torch.Generator` is refused: `secure_random`).
        head_max_grad_norm (`float`, *optional*): None: one joint clip to C. A number C_h: clipping groups, the LoRA
            factors to C and the head (every other tensor) to C_h; the noise is calibrated to the joint sensitivity
            sqrt(C^2 + C_h^2) of the active groups, so sigma keeps its meaning.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        per_sample_max_grad_norm: float,
        factor_of: Optional[dict] = None,
        lowpass_kernel: Optional[tuple] = None,
        generator: Optional[SecureRandom] = None,
        head_max_grad_norm: Optional[float] = None,
    ):
        check_number("noise_multiplier", noise_multiplier, "a finite number >= 0", lambda v: 0 <= v < math.inf)
        check_positive(
            "per_sample_max_grad_norm", per_sample_max_grad_norm, "the fixed per-example clip norm C, e.g. 1.0"
        )
        if head_max_grad_norm is not None:
            check_positive("head_max_grad_norm", head_max_grad_norm, "or None for one joint clip")
        self.head_max_grad_norm = None if head_max_grad_norm is None else float(head_max_grad_norm)
        self.optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(per_sample_max_grad_norm)
        self.factor_of = dict(factor_of or {})
        self.lowpass_kernel = tuple(lowpass_kernel) if lowpass_kernel else None
        self.generator = generator
        self.dropped_samples = 0
        self._warned = False

    @property
    def generator(self) -> SecureRandom:
        return self._generator

    @generator.setter
    def generator(self, value: Optional[SecureRandom]) -> None:
        if value is None:
            value = SecureRandom.fresh("noise")
        if not isinstance(value, SecureRandom):
            raise ConfigError(
                f"`generator` must be a peft_lalora SecureRandom (a ChaCha20 stream keyed by the private root), got "
                f"{type(value).__name__}: torch's generators keep 32 (CPU) or 64 (CUDA) bits of a seed, so their "
                "noise can be re-created by a brute force. Pass `SecureRandom(root, 'noise', ...)` or None."
            )
        self._generator = value

    # ----- stages ----------------------------------------------------------------------------------------------
    def clip_factors(self, grad_samples: dict) -> torch.Tensor:
        """Per-example scale factors min(1, C / ||g_i||) of the joint L2 norm over the active tensors; 0 for an
        example whose gradient is not finite (dropped and counted)."""
        return self._factors_by_group(grad_samples, lambda name: "joint")["joint"]

    def group_of(self, name: str) -> str:
        """The clipping group of a tensor: "joint" without clipping groups, else "lora" (a factor) or "head"."""
        if self.head_max_grad_norm is None:
            return "joint"
        return "lora" if name in self.factor_of else "head"

    def group_clip_factors(self, grad_samples: dict) -> dict:
        """Per-tensor per-example factors min(1, C_g / ||g_i restricted to the tensor's group g||): one joint
        group (`clip_factors`) by default, {lora, head} with clipping groups; an example with a non-finite
        gradient in any group is dropped from all of them."""
        factors = self._factors_by_group(grad_samples, self.group_of)
        return {name: factors[self.group_of(name)] for name in grad_samples}

    def _factors_by_group(self, grad_samples: dict, group_of) -> dict:
        first = next(iter(grad_samples.values()))
        batch = first.shape[0]
        sq = {}
        for name, g in grad_samples.items():
            flat = g.reshape(batch, -1)
            if flat.dtype in (torch.bfloat16, torch.float16):  # squared in bf16, norms overshot C by 0.17 %
                part = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32).to(torch.float64).pow(2)
            else:
                part = flat.pow(2).sum(dim=1, dtype=torch.float64)
            group = group_of(name)
            sq[group] = sq[group] + part if group in sq else part
        norms = {group: v.sqrt() for group, v in sq.items()}
        keep = torch.stack([torch.isfinite(v) for v in norms.values()]).all(dim=0)
        self._count_dropped(int((~keep).sum()))
        return {
            group: torch.where(keep, (self._threshold(group) / (v + 1e-6)).clamp(max=1.0), torch.zeros_like(v))
            for group, v in norms.items()
        }

    def _threshold(self, group: str) -> float:
        return self.head_max_grad_norm if group == "head" else self.max_grad_norm

    def sensitivity(self, names) -> float:
        """The per-example L2 sensitivity of the summed gradient of the tensors `names`: C for one joint clip,
        sqrt(sum of C_g^2) over the groups present with clipping groups."""
        if self.head_max_grad_norm is None:
            return self.max_grad_norm
        return math.sqrt(sum(self._threshold(g) ** 2 for g in {self.group_of(n) for n in names}))

    @staticmethod
    def sum_clipped(grad_samples: dict, factors) -> dict:
        """sum_i factor_i * g_i for every tensor, without materialising the clipped per-example gradients;
        a dropped (non-finite) example contributes exactly zero. `factors`: one (B,) tensor for every tensor,
        or a dict of them per tensor (clipping groups)."""
        out = {}
        for name, g in grad_samples.items():
            tensor_factors = factors[name] if isinstance(factors, dict) else factors
            dropped = tensor_factors == 0
            if bool(dropped.any()):
                g = torch.where(dropped.view((-1,) + (1,) * (g.dim() - 1)), torch.zeros_like(g), g)
            acc = torch.promote_types(g.dtype, torch.float32)  # bf16 gradients are summed in float32
            out[name] = torch.einsum("b...,b->...", g.to(acc), tensor_factors.to(acc))
        return out

    def add_noise(self, summed: dict) -> dict:
        """+ N(0, (sigma C)^2) from the secure stream, added in at least float32 (a bfloat16 draw would keep 8 bits
        of the noise)."""
        if self.noise_multiplier == 0.0:
            return summed
        std = self.noise_multiplier * self.sensitivity(summed)
        out = {}
        for name, s in summed.items():
            dtype = torch.promote_types(s.dtype, torch.float32)
            out[name] = s.to(dtype) + self.generator.normal(std, s.shape, device=s.device, dtype=dtype)
        return out

    def lowpass(self, grads: dict) -> dict:
        if self.lowpass_kernel is None:
            return grads
        return {
            name: lowpass_filter(g, self.factor_of[name], self.lowpass_kernel) if name in self.factor_of else g
            for name, g in grads.items()
        }

    # ----- the step --------------------------------------------------------------------------------------------
    def privatize(self, grad_samples: dict, params: dict, expected_batch_size: float) -> dict:
        """clip -> sum -> noise -> scale -> lowpass: the noisy gradient of every active tensor."""
        if not expected_batch_size > 0:
            raise ConfigError(f"`expected_batch_size` must be > 0, got {expected_batch_size!r}.")
        if grad_samples and next(iter(grad_samples.values())).shape[0] > 0:
            summed = self.sum_clipped(grad_samples, self.group_clip_factors(grad_samples))
        else:  # an empty Poisson batch: a noise-only step, accounted like any other
            summed = {
                name: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                for name, p in params.items()
            }
        noisy = self.add_noise(summed)
        scaled = {name: g / expected_batch_size for name, g in noisy.items()}
        return self.lowpass(scaled)

    def step(self, grad_samples: dict, params: dict, expected_batch_size: float) -> dict:
        """Privatise the per-sample gradients of `params` (name -> active parameter), then run the inner step.
        Every other parameter keeps `.grad = None`, so no optimizer (momentum, weight decay) moves it."""
        grads = self.privatize(grad_samples, params, expected_batch_size)
        for name, param in params.items():
            param.grad = grads[name].to(param.dtype)
        self.optimizer.step()
        for param in params.values():
            param.grad = None
        return grads

    def _count_dropped(self, count: int) -> None:
        if count == 0:
            return
        self.dropped_samples += count
        if not self._warned:
            self._warned = True
            warnings.warn(  # no count: how many examples were dropped is computed from private data
                "An example had a non-finite per-sample gradient and was dropped from the step (it adds nothing; "
                "the noise and the accounting are unchanged). Drops are counted in `dropped_samples` (private: "
                "computed from the data without noise) without a further warning.",
                LALoraWarning,
                stacklevel=3,
            )
