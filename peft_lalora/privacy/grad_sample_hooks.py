"""Per-sample gradients with Opacus' per-layer grad samplers, driven by our own module hooks.

The model is not wrapped (its state-dict keys stay peft's). Only the modules owning a tensor trainable in this call
are hooked, re-attached when that set changes (LA-LoRA alternates factors), so a frozen factor never meets a hook
("No activations detected" in plain Opacus). The forward hook keeps a module's inputs (checking that dim 0 is the
batch); a tensor hook on its output turns the backprops into per-example gradients with Opacus' grad sampler during
the backward pass, so no layer's backprops outlive it (at sequence length 2048 they would be the step's largest
extra memory). The backward uses `torch.autograd.grad`: no `.grad` is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from opacus.grad_sample import GradSampleHooks
from torch import nn

from ..errors import UnsupportedModelError, UntraceableModelError
from .grad_sample_base import (
    PerSampleGradients,
    check_losses,
    first_adapter_module,
    is_windowed,
    model_inputs,
    model_type,
)
from .losses import per_example_loss

logger = logging.getLogger(__name__)
# Opacus' registry: module type -> `fn(module, activations, backprops) -> {param: (B, *shape)}`
GRAD_SAMPLERS = GradSampleHooks.GRAD_SAMPLERS


class HooksBackend(PerSampleGradients):
    """Per-sample gradients from Opacus' grad samplers (exact when every hooked layer sees the examples in dim 0)."""

    name = "hooks"

    def __init__(self, model: nn.Module, loss_fn: Callable = per_example_loss):
        super().__init__(model, loss_fn)
        if is_windowed(model):
            raise UnsupportedModelError(
                f"`backend='hooks'` is inexact for model_type {model_type(model)!r}: module "
                f"`{first_adapter_module(model)}` sees attention windows folded into the batch dimension, so hooks "
                "would give per-window gradients. Use `backend='func'` (or 'auto')."
            )
        self._handles: list = []
        self._hooked: dict[nn.Module, str] = {}
        self._attached_for: frozenset = frozenset()
        self._grads = None  # id(param) -> (B, *shape) summed over the module's calls; None outside compute()
        self._batch_size = 0

    # ----- hooks -------------------------------------------------------------------------------------------
    def _attach(self, params: dict) -> None:
        """Hook exactly the modules that own a tensor of `params` (re-attached when the set changes)."""
        key = frozenset(params)
        if key == self._attached_for and self._handles:
            return
        self.close()
        wanted = {id(p) for p in params.values()}
        hooked = {}
        for name, module in self.model.named_modules():
            if not any(id(p) in wanted for p in module.parameters(recurse=False)):
                continue
            if type(module) not in GRAD_SAMPLERS:
                raise UnsupportedModelError(
                    f"module `{name}` ({type(module).__name__}) owns a trainable tensor but Opacus has no grad sampler "
                    "for its type, so `backend='hooks'` cannot give exact per-sample gradients. Use `backend='func'`, "
                    "or make the trainable tensors live in nn.Linear / nn.Embedding / nn.LayerNorm layers."
                )
            hooked[module] = name
        self._handles = [module.register_forward_hook(self._forward_hook) for module in hooked]
        self._hooked, self._attached_for = hooked, key
        logger.debug("hooks backend: hooked %d modules for %d tensors", len(hooked), len(params))

    def close(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        self._hooked, self._attached_for = {}, frozenset()

    def _forward_hook(self, module: nn.Module, inputs, output) -> None:
        if self._grads is None or not torch.is_grad_enabled():
            return  # inert outside compute()
        if not isinstance(output, torch.Tensor):
            raise UnsupportedModelError(
                f"module `{self._hooked[module]}` returned a {type(output).__name__}, not a tensor, so its output "
                "gradient cannot be captured. Use `backend='func'`."
            )
        if not output.requires_grad:
            return
        activations = [t.detach() for t in inputs if isinstance(t, torch.Tensor)]
        if not activations or activations[0].dim() == 0 or activations[0].shape[0] != self._batch_size:
            got = tuple(activations[0].shape) if activations else None
            raise UnsupportedModelError(
                f"module `{self._hooked[module]}` received an input of shape {got} whose dim 0 is not the batch of "
                f"{self._batch_size} examples, so hooks cannot give exact per-sample gradients for it. "
                "Use `backend='func'` (torch.func over examples)."
            )
        grads = self._grads
        output.register_hook(lambda grad: self._accumulate(grads, module, activations, grad))

    def _accumulate(self, grads: dict, module: nn.Module, activations: list, backprops) -> None:
        """Per-example gradients of one call of `module`, added to `grads` (during the backward pass)."""
        if backprops is None:  # autograd reached the output with an undefined gradient: a layer above has no backward
            raise UntraceableModelError(
                f"module `{self._hooked[module]}` received no gradient for its output although it feeds the loss: a "
                "layer between it and the loss has no backward (e.g. a quantized kernel for inference only), so its "
                "per-sample gradients would be wrong. Load the base unquantized or with bitsandbytes "
                "(`BitsAndBytesConfig(load_in_4bit=True)`), whose layers peft_lalora prepares for training."
            )
        backprops = backprops.detach()
        if backprops.shape[0] != self._batch_size:
            raise UnsupportedModelError(
                f"module `{self._hooked[module]}` got output gradients of shape {tuple(backprops.shape)} whose "
                f"dim 0 is not the batch of {self._batch_size}. Use `backend='func'`."
            )
        for param, sample in GRAD_SAMPLERS[type(module)](module, activations, backprops).items():
            key = id(param)
            grads[key] = sample if key not in grads else grads[key] + sample

    # ----- compute -----------------------------------------------------------------------------------------
    def _compute(self, batch, params, batch_size):
        self._attach(params)
        self._grads, self._batch_size = {}, batch_size
        try:
            with torch.enable_grad():
                losses = self.loss_fn(self.model(**model_inputs(batch)), batch)
                check_losses(losses, batch_size)
                if losses.requires_grad:
                    torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)
            by_param = self._grads
        finally:
            self._grads = None
        grads = {}
        for name, param in params.items():
            sample = by_param.get(id(param))
            if sample is None:  # a module whose output did not reach the loss: zero gradient
                logger.debug("hooks backend: %s took no part in the loss; its per-sample gradient is zero", name)
                sample = param.new_zeros((batch_size, *param.shape))
            grads[name] = sample.detach()
        return grads, losses
