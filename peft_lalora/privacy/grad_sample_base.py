"""The contract shared by the per-sample-gradient backends, and the model checks both use."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from .losses import per_example_loss

# Models that fold something other than examples (Swin: attention windows) into dim 0 of their layers' inputs.
WINDOWED_MODEL_TYPES = frozenset({"swin", "swinv2", "donut-swin", "maskformer-swin", "swin2sr"})


class PerSampleGradients:
    """
    Exact per-example gradients of `loss_fn` for the trainable tensors of a model, one backend per subclass.

    Args:
        model (`torch.nn.Module`): the model, typically a peft `PeftModel`; put it on its device first.
        loss_fn (`Callable`, defaults to `per_example_loss`): `loss_fn(outputs, batch) -> Tensor (B,)`.

    `compute(batch, params)` returns `({name: (B, *param.shape)}, losses (B,))` for exactly the tensors in
    `params` and never touches `param.grad`. The set of `params` may change between calls (LA-LoRA alternates
    between the B and the A factors). Use the backend as a context manager, or call `close()` when done.
    """

    name: str = "base"

    def __init__(self, model: nn.Module, loss_fn: Callable = per_example_loss):
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"`model` must be a torch.nn.Module (e.g. a peft PeftModel), got {type(model).__name__}."
            )
        if not callable(loss_fn):
            raise ConfigError(
                f"`loss_fn` must be callable as loss_fn(outputs, batch) -> Tensor (B,), got {loss_fn!r}."
            )
        refuse_batch_norm(model)
        self.model = model
        self.loss_fn = loss_fn

    def compute(
        self, batch: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The per-example gradients and losses (detached) of the class docstring; every parameter not in `params`
        must be frozen. An empty batch (B = 0, possible under Poisson sampling) gives empty tensors, no forward."""
        batch_size = check_batch(batch)
        params = self._check_params(params)
        refuse_unverified_checkpointing(self.model, self.name)
        if batch_size == 0:
            empty = {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
            return empty, next(iter(params.values())).new_zeros((0,))
        grads, losses = self._compute(batch, params, batch_size)
        return grads, losses.detach()

    def _compute(self, batch, params, batch_size):  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend attached to the model (hooks). Safe to call more than once."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _check_params(self, params: Mapping[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        if not isinstance(params, Mapping) or not params:
            raise ConfigError(
                f"`params` must be a non-empty dict {{name: parameter}} from model.named_parameters(), got {params!r}."
            )
        named = dict(self.model.named_parameters())
        for name, param in params.items():
            if named.get(name) is not param:
                raise ConfigError(
                    f"`params` key {name!r} is not the name of that parameter in model.named_parameters(). "
                    "Build `params` from model.named_parameters()."
                )
            if not param.requires_grad:
                raise ConfigError(f"`params` entry {name!r} has requires_grad=False; pass only the trainable tensors.")
        extra = [n for n, p in named.items() if p.requires_grad and n not in params]
        if extra:
            raise ConfigError(
                f"`params` must hold every trainable parameter of the model; {len(extra)} more require grad, "
                f"e.g. {extra[:3]}. Freeze them (LALoraModel.set_trainable_factors) or add them to `params`."
            )
        return dict(params)


def check_batch(batch: Mapping[str, torch.Tensor]) -> int:
    """The batch size B of a batch dict, after checking that every tensor in it has B rows."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get("labels"), torch.Tensor):
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ConfigError(f"`batch` must be a dict of tensors with the targets under 'labels', got {keys}.")
    batch_size = batch["labels"].shape[0] if batch["labels"].dim() else -1
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != batch_size):
            raise ConfigError(
                f"`batch[{key!r}]` must have the batch size {batch_size} of `batch['labels']` in dim 0, "
                f"got shape {tuple(value.shape)}. Stack one row per example."
            )
    return batch_size


def check_losses(losses, batch_size: int) -> None:
    """`loss_fn` must give one loss per example."""
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (batch_size,):
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ConfigError(
            f"`loss_fn` must return one loss per example, shape ({batch_size},), got {got}. "
            "Use reduction='none' (per_example_loss does)."
        )


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict:
    """The keyword arguments of the model call: the batch without its labels (the loss is computed here)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def model_type(model: nn.Module) -> Optional[str]:
    """`config.model_type` of the transformers model under a peft wrapper, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return getattr(config, "model_type", None)


def is_windowed(model: nn.Module) -> bool:
    return model_type(model) in WINDOWED_MODEL_TYPES


def first_adapter_module(model: nn.Module) -> str:
    """Name of the first module owning a LoRA leaf or a trainable tensor (for error messages)."""
    for name, module in model.named_modules():
        if (".lora_A." in name or ".lora_B." in name) and list(module.parameters(recurse=False)):
            return name
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            return name
    return type(model).__name__


def refuse_unverified_checkpointing(model: nn.Module, backend: str) -> None:
    """
    Gradient checkpointing is exact with the hooks backend when it is non-reentrant (`use_reentrant=False`,
    transformers 5's default: the backward runs through the first forward's graph). Reentrant checkpointing
    runs its own inner backward, which `torch.autograd.grad` never sees: the LoRA tensors inside the checkpointed
    layers would get zero per-sample gradients (measured on Llama, Qwen2 and GPT-2), so it is refused; so is any
    checkpointing under `torch.func.vmap`, which cannot trace it.
    """
    # the modules with transformers' gradient checkpointing switched on (`gradient_checkpointing_enable()`)
    modules = [(name, m) for name, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True]
    if not modules:
        return
    name, module = modules[0]
    func = getattr(module, "_gradient_checkpointing_func", None)
    reentrant = getattr(func, "keywords", {}).get("use_reentrant", True) is not False
    if reentrant:
        raise UnsupportedModelError(
            f"module `{name}` uses reentrant gradient checkpointing (`use_reentrant` is not False, got {func!r}): its "
            "inner backward is invisible to per-sample gradients, which would be zero for the checkpointed layers. "
            "Enable it with `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
            "False})`, or call `model.gradient_checkpointing_disable()`."
        )
    if backend != "hooks":
        raise UnsupportedModelError(
            f"module `{name}` uses gradient checkpointing, which `backend={backend!r}` (torch.func.vmap) cannot trace. "
            "Use `backend='hooks'` (exact with non-reentrant checkpointing), or call "
            "`model.gradient_checkpointing_disable()`."
        )


def refuse_batch_norm(model: nn.Module) -> None:
    """BatchNorm mixes the examples of a batch: no per-sample gradient is exact (and DP does not hold)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedModelError(
                f"module `{name}` ({type(module).__name__}) normalises over the batch, so examples are not independent "
                "and no per-sample gradient is exact. Replace it with GroupNorm/LayerNorm (opacus.validators.ModuleValidator.fix)."
            )
