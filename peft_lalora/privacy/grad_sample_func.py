"""Per-sample gradients with `torch.func`: `vmap(grad(loss of one example))` over the examples of a batch.

The trainable tensors are the differentiated inputs of a `functional_call`; frozen parameters and buffers are
closed over from the module. Each example runs through the whole model alone (batch dimension 1), so the
result is exact for any architecture that vmap can trace, including Swin, whose attention windows break hooks.
Dropout draws independent masks per example (`randomness="different"`).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import LALoraError, UnsupportedModelError
from .grad_sample_base import PerSampleGradients, check_losses, model_inputs, model_type

logger = logging.getLogger(__name__)


class FuncBackend(PerSampleGradients):
    """Per-sample gradients by `torch.func.vmap` over examples of `torch.func.grad` (whole-model, exact)."""

    name = "func"
    _math_attention = False  # set once the fused attention kernels refused this model under vmap

    def _compute(self, batch, params, batch_size):
        names = list(params)
        primals = tuple(p.detach() for p in params.values())
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        static = {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)}

        def loss_of_one(primal_values, example):
            one = {k: v.unsqueeze(0) for k, v in example.items()}
            one.update(static)
            outputs = functional_call(self.model, dict(zip(names, primal_values)), args=(), kwargs=model_inputs(one))
            loss = self.loss_fn(outputs, one)
            check_losses(loss, 1)
            return loss[0], loss[0].detach()

        per_example = vmap(grad(loss_of_one, has_aux=True), in_dims=(None, 0), randomness="different")
        try:
            try:
                with torch.enable_grad(), self._attention_kernels():
                    grads, losses = per_example(primals, tensors)
            except RuntimeError as exc:
                # On CUDA, SDPA's fused kernels reject a batched attention bias under vmap ("attn_bias: wrong shape
                # (batch dimension)", measured on an H100 with Swin); the math kernel accepts it. It is not forced
                # everywhere: under bf16 autocast it failed for ViT where the fused one runs.
                if self._math_attention or "attn_bias" not in str(exc):
                    raise
                self._math_attention = True
                logger.info("func backend: fused attention refused vmap (%s); using the math kernel", exc)
                with torch.enable_grad(), self._attention_kernels():
                    grads, losses = per_example(primals, tensors)
        except LALoraError:
            raise
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            raise UnsupportedModelError(
                f"`backend='func'` could not run model_type {model_type(self.model)!r} ({type(self.model).__name__}) "
                f"under torch.func.vmap: {type(exc).__name__}: {exc}. Use `backend='hooks'` if every trainable "
                "layer sees the examples in dim 0."
            ) from exc
        return {name: g.detach() for name, g in zip(names, grads)}, losses

    def _attention_kernels(self):
        return sdpa_kernel([SDPBackend.MATH]) if self._math_attention else contextlib.nullcontext()
