"""`LALoraModel`: peft's `LoraModel` (same layers, forward, merge and save format) plus the factor schedule."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import NoMatchingPeftModuleError

from ..errors import ConfigError, LALoraWarning
from . import schedule
from .config import LALoraConfig


class LALoraModel(LoraModel):
    """
    Creates an LA-LoRA model from a pretrained transformers model. Reached as `peft_model.base_model` after
    `get_peft_model(model, LALoraConfig(...))`.

    The adapter layers are peft's LoRA layers (`lora_A` / `lora_B` `nn.Linear` leaves), so merging, dropout,
    saving and per-sample gradients by Opacus' hooks behave exactly as for LoRA. What this class adds is the
    schedule: `trainable_factors(round_idx, step)` says which factor trains when, and
    `set_trainable_factors(factors)` puts the model in that phase.
    """

    prefix: str = "lora_"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # injects the first adapter
        self._factor_params: dict[str, list] = {}  # adapter name -> `factor_parameters(name)`, filled on first use

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        self._factor_params = {}  # the set of LoRA layers changes (the first call comes from `__init__`)
        try:
            result = super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as exc:
            config = self.peft_config[adapter_name]
            raise ConfigError(
                f"`target_modules` {sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules!r} "
                f"matched no module of {type(model).__name__}. Candidate module names (nn.Linear leaves): "
                f"{candidate_module_names(model)}. Pass some of these as `target_modules`."
            ) from exc
        # peft raises only when no name matches; a list with a typo would train the other modules without a word
        unmatched = unmatched_target_modules(self.peft_config[adapter_name].target_modules, self.targeted_module_names)
        if unmatched:
            warnings.warn(
                f"`target_modules` {unmatched} matched no module of {type(model).__name__}, so only "
                f"{sorted({key.rsplit('.', 1)[-1] for key in self.targeted_module_names})} get adapters. Candidate "
                f"module names (nn.Linear leaves): {candidate_module_names(model)}. Fix or drop the unmatched names.",
                LALoraWarning,
                stacklevel=2,
            )
        return result

    # ----- the schedule -------------------------------------------------------------------------------------
    def _config(self, adapter_name: Optional[str] = None) -> LALoraConfig:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ConfigError(
                f"`adapter_name` {name!r} is not an adapter of this model; have {list(self.peft_config)}."
            )
        return self.peft_config[name]

    def trainable_factors(self, round_idx: int, step: int, adapter_name: Optional[str] = None) -> frozenset:
        """The factors (`frozenset` of `"A"` / `"B"`) that train at local step `step` of round `round_idx`."""
        return schedule.trainable_factors(self._config(adapter_name), round_idx, step)

    def set_trainable_factors(self, factors, adapter_name: Optional[str] = None) -> frozenset:
        """
        Put the adapter in the phase where only `factors` train: the inactive factor gets `requires_grad=False`
        and `.grad = None` (so no optimizer, with momentum or weight decay, moves it). A trainable head
        (`modules_to_save`) keeps training in every phase. Returns the factors as a frozenset.
        """
        factors = schedule.check_factors(factors)
        if self._config(adapter_name).alternation == "freeze_a" and "A" in factors:
            raise ConfigError(
                f"`factors` {set(factors)} asks A to train, but `alternation='freeze_a'` (FFA-LoRA) keeps A frozen."
            )
        for factor, param in self.factor_parameters(adapter_name):
            active = factor in factors
            param.requires_grad_(active)
            if not active:
                param.grad = None
        return factors

    def delete_adapter(self, adapter_name: str) -> None:
        self._factor_params = {}
        super().delete_adapter(adapter_name)

    def factor_parameters(self, adapter_name: Optional[str] = None) -> list[tuple[str, torch.nn.Parameter]]:
        """`("A", weight)` / `("B", weight)` for every LoRA layer of the adapter, in module order (kept until an
        adapter is added or deleted: the schedule switches factors at every local step, and a large model has
        many modules to walk)."""
        name = adapter_name or self.active_adapters[0]
        if name not in self._factor_params:
            pairs = []
            for module in self.model.modules():
                if isinstance(module, LoraLayer) and name in module.lora_A:
                    pairs += [("A", module.lora_A[name].weight), ("B", module.lora_B[name].weight)]
            self._factor_params[name] = pairs
        return self._factor_params[name]


def unmatched_target_modules(target_modules, targeted_module_names: list) -> list:
    """The names of a `target_modules` list that no adapted module matched (peft's rule: the full module name
    equals the entry or ends with `.<entry>`); [] for a regex string or "all-linear", which peft matches whole."""
    if not target_modules or isinstance(target_modules, str):
        return []
    return sorted(
        name
        for name in target_modules
        if not any(key == name or key.endswith(f".{name}") for key in targeted_module_names)
    )


def candidate_module_names(model: torch.nn.Module, limit: int = 20) -> list:
    """The distinct last name parts of the model's `nn.Linear` leaves: what `target_modules` may name."""
    names = []
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and full_name:
            short = full_name.rsplit(".", 1)[-1]
            if short not in names:
                names.append(short)
    return names[:limit]
