"""The Gaussian low-pass filter of LA-LoRA, applied to one LoRA factor's (noisy) gradient.

A (r x d_in) is smoothed along d_in, B (d_out x r) along d_out, i.e. always along the long, non-rank axis,
with reflect padding. It only post-processes a privatised gradient, so it costs no privacy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def lowpass_filter(grad: torch.Tensor, factor: str, kernel=(1.0, 4.0, 6.0, 4.0, 1.0)) -> torch.Tensor:
    """Smooth the gradient of `lora_A` (r x d_in, `factor="A"`) or `lora_B` (d_out x r) along its non-rank axis with
    `kernel` (normalised to sum 1); a new tensor with `grad`'s shape, dtype and device."""
    if factor not in ("A", "B"):
        raise ConfigError(f"`factor` must be 'A' or 'B', got {factor!r}.")
    if grad.dim() != 2:
        raise ConfigError(f"`grad` must be a 2-D LoRA factor gradient, got shape {tuple(grad.shape)}.")
    weights = torch.as_tensor(kernel, dtype=torch.float32, device=grad.device)
    weights = weights / weights.sum()
    rows = grad.float() if factor == "A" else grad.float().t()  # filter along dim 1 of `rows`
    half = weights.numel() // 2
    if rows.shape[1] <= half:  # reflect padding needs more samples than the half-width: nothing to smooth
        return grad.clone()
    padded = F.pad(rows.unsqueeze(1), (half, half), mode="reflect")
    smoothed = F.conv1d(padded, weights.view(1, 1, -1)).squeeze(1)
    out = smoothed if factor == "A" else smoothed.t()
    return out.to(grad.dtype).contiguous()
