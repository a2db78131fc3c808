"""Exact per-sample gradients of the trainable LoRA tensors: the choice of backend (`PerSampleGradients`).

>>> backend = select_backend(peft_model)                # "hooks" for BERT, "func" for Swin
>>> params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
>>> grads, losses = backend.compute(batch, params)      # grads[n].shape == (B, *p.shape)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from ..errors import ConfigError
from .grad_sample_base import PerSampleGradients, is_windowed, model_type
from .grad_sample_func import FuncBackend
from .grad_sample_hooks import GRAD_SAMPLERS, HooksBackend
from .losses import per_example_loss
from .quantized import prepare_quantized_layers, refuse_batch_dependent_quantization

logger = logging.getLogger(__name__)

BACKENDS = {"hooks": HooksBackend, "func": FuncBackend}


def select_backend(
    model: nn.Module, backend: str = "auto", loss_fn: Callable = per_example_loss
) -> PerSampleGradients:
    """
    The per-sample-gradient backend for `model`.

    Args:
        model (`torch.nn.Module`): the (peft) model.
        backend (`str`, defaults to `"auto"`): `"hooks"` (Opacus' per-layer grad samplers: fast, exact when every
            trainable layer sees the examples in dim 0: BERT, RoBERTa, ViT, Llama), `"func"` (`torch.func` vmap over
            examples: exact for anything vmap traces, e.g. Swin) or `"auto"`: `"func"` for windowed models (Swin)
            and for a trainable layer Opacus has no grad sampler for, else `"hooks"`.
        loss_fn (`Callable`, defaults to `per_example_loss`): per-example loss, `loss_fn(outputs, batch) -> (B,)`.

    Raises:
        ConfigError: unknown backend name.
        UnsupportedModelError: no backend computes this model's per-sample gradients exactly (e.g. BatchNorm, a
            quantized layer type other than bitsandbytes'), or the requested one cannot.
    """
    prepare_quantized_layers(model)
    refuse_batch_dependent_quantization(model)
    if backend == "auto":
        backend = "func" if is_windowed(model) or not hooks_cover(model) else "hooks"
        logger.info("per-sample gradients: backend %r for model_type %r", backend, model_type(model))
    if backend not in BACKENDS:
        raise ConfigError(f"`backend` must be one of {('auto', *BACKENDS)}, got {backend!r}.")
    return BACKENDS[backend](model, loss_fn=loss_fn)


def hooks_cover(model: nn.Module) -> bool:
    """Whether Opacus has a grad sampler for every module that owns an adapter, head or trainable tensor."""
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        adapter = any(part in f".{name}." for part in (".lora_A.", ".lora_B.", ".modules_to_save."))
        if own and (adapter or any(p.requires_grad for p in own)) and type(module) not in GRAD_SAMPLERS:
            logger.debug("hooks cannot sample module %s (%s)", name, type(module).__name__)
            return False
    return True


__all__ = ["BACKENDS", "FuncBackend", "HooksBackend", "PerSampleGradients", "hooks_cover", "select_backend"]
