"""`LALoraConfig`: a `LoraConfig` that also says which LoRA factor trains when, and how its gradient is smoothed."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Optional

from peft import LoraConfig

from ..checks import check_int, check_positive
from ..errors import ConfigError
from .methods import ALTERNATIONS, METHODS, alternation_titles, method_of


class _PeftTypeName(str):
    """The string "LALORA" with the `.value` that code written for peft's `PeftType` enum reads
    (transformers' `load_adapter` calls `peft_config.peft_type.value`). JSON writes it as a plain string."""

    @property
    def value(self) -> str:
        return str(self)


PEFT_TYPE = _PeftTypeName("LALORA")
FACTORS = ("A", "B")
DEFAULT_KERNEL = (1.0, 4.0, 6.0, 4.0, 1.0)
_TITLES = alternation_titles()  # "'local' (LA-LoRA)", ...


@dataclass
class LALoraConfig(LoraConfig):
    """
    Configuration of an LA-LoRA adapter (Liu et al., ICLR 2026). The forward pass is plain LoRA; the extra
    fields say which of the two factors trains at each local step of federated training.

    Args:
        alternation (`str`, defaults to `"local"`):
            Which factor trains when. `"local"`: LA-LoRA, alternate inside a client's local steps;
            `"round"`: RoLoRA, all clients train one factor per round; `"freeze_a"`: FFA-LoRA, only B trains and
            A keeps its random initialisation; `"none"`: DP-LoRA, both factors at every step.
        alternation_period (`int`, defaults to `1`):
            Local steps (for `"local"`) or rounds (for `"round"`) per phase.
        first_factor (`str`, defaults to `"B"`):
            The factor that trains in the first phase. B first, because B starts at zero and A's first
            gradient is then exactly zero.
        lowpass (`bool`, *optional*):
            Smooth the active factor's noisy gradient with a Gaussian low-pass filter (post-processing, no
            privacy cost). Defaults to on for `"local"` and off otherwise.
        lowpass_kernel (`tuple[float]`, defaults to `(1, 4, 6, 4, 1)`):
            The filter kernel, normalised to sum 1 when applied. Odd length, non-negative, positive sum.
    """

    alternation: str = field(
        default="local",
        metadata={"help": f"Factor schedule: {', '.join(_TITLES)}."},
    )
    alternation_period: int = field(default=1, metadata={"help": "Local steps (or rounds for 'round') per phase."})
    first_factor: str = field(default="B", metadata={"help": "Factor trained in the first phase: 'B' or 'A'."})
    lowpass: Optional[bool] = field(
        default=None,
        metadata={"help": "Gaussian low-pass filter on the active factor's gradient (default: on for 'local')."},
    )
    lowpass_kernel: tuple = field(
        default=DEFAULT_KERNEL, metadata={"help": "Low-pass kernel, normalised to sum 1; odd length, non-negative."}
    )

    def __post_init__(self):
        for name in ("r", "lora_alpha"):
            check_positive(name, getattr(self, name), "LoRA needs a positive rank and scale, e.g. r=8, lora_alpha=16")
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.alternation not in ALTERNATIONS:
            uses = [title.replace(" (", " for ").rstrip(")") for title in _TITLES]
            raise ConfigError(
                f"`alternation` must be one of {ALTERNATIONS}, got {self.alternation!r}. Use "
                f"{', '.join(uses[:-1])} or {uses[-1]}."
            )
        check_int("alternation_period", self.alternation_period, 1)
        if self.first_factor not in FACTORS:
            raise ConfigError(f"`first_factor` must be 'A' or 'B', got {self.first_factor!r}.")
        if self.alternation == "freeze_a" and self.first_factor != "B":
            raise ConfigError("`first_factor` must be 'B' with `alternation='freeze_a'` (A never trains), got 'A'.")
        if self.lowpass is None:  # the alternation's primary method's: on for "local" (LA-LoRA), else off
            self.lowpass = method_of(self.alternation).lowpass
        if not isinstance(self.lowpass, bool):
            raise ConfigError(
                f"`lowpass` must be True, False or None (the method's default), got {self.lowpass!r} of "
                f"type {type(self.lowpass).__name__}; a string such as 'false' would count as true."
            )
        self.lowpass_kernel = _check_kernel(self.lowpass_kernel)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, **kwargs):
        """peft's loader (`PeftModel.from_pretrained` calls it), which also records where the adapter came from in
        `adapter_source` (not a field: never written to adapter_config.json), so that a trainer can find the
        earlier run's privacy report offline: `{"folder": local folder}` for a local adapter, or
        `{"hub_repo": id, "folder": its cached snapshot folder or None}` for a Hub adapter."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.adapter_source = _adapter_source(os.fspath(pretrained_model_name_or_path), subfolder, kwargs)
        return config

    @classmethod
    def for_method(cls, method: str, **kwargs) -> LALoraConfig:
        """Config for one of the paper's methods: a name in `peft_lalora.tuner.METHODS` (`lalora`, ...)."""
        if method not in METHODS:
            raise ConfigError(f"`method` must be one of {tuple(METHODS)}, got {method!r}.")
        fixed = sorted({"alternation", "lowpass"} & set(kwargs))
        if fixed:
            raise ConfigError(
                f"{', '.join(f'`{k}`' for k in fixed)} is set by `method`={method!r}; pick the method "
                "that has it (e.g. 'lalora_nofilter' for LA-LoRA without the filter), or build "
                "`LALoraConfig(alternation=..., lowpass=...)` directly."
            )
        return cls(alternation=METHODS[method].alternation, lowpass=METHODS[method].lowpass, **kwargs)


def _adapter_source(path: str, subfolder: Optional[str], kwargs: dict) -> dict:
    folder = os.path.join(path, subfolder) if subfolder else path
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return {"folder": os.path.abspath(folder)}
    from huggingface_hub import try_to_load_from_cache  # offline: the local cache only

    name = "adapter_config.json" if not subfolder else f"{subfolder}/adapter_config.json"
    cached = try_to_load_from_cache(path, name, cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"))
    return {"hub_repo": path, "folder": os.path.dirname(cached) if isinstance(cached, str) else None}


def _check_kernel(kernel) -> tuple:
    if isinstance(kernel, (str, bytes)):
        raise ConfigError(
            f"`lowpass_kernel` must be a sequence of numbers such as (1, 4, 6, 4, 1), got the string "
            f"{kernel!r} (its characters would be read as digits)."
        )
    try:
        items = tuple(kernel)
    except TypeError as exc:
        raise ConfigError(f"`lowpass_kernel` must be a sequence of numbers, got {kernel!r}.") from exc
    if not all(isinstance(k, numbers.Real) and not isinstance(k, bool) for k in items):
        raise ConfigError(f"`lowpass_kernel` must hold numbers, got {kernel!r}: pass e.g. (1, 4, 6, 4, 1).")
    values = tuple(float(k) for k in items)
    if not values:
        raise ConfigError(
            "`lowpass_kernel` must not be empty; use the default (1, 4, 6, 4, 1) or set `lowpass=False`."
        )
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(f"`lowpass_kernel` must hold finite non-negative weights, got {kernel!r}.")
    if sum(values) <= 0:
        raise ConfigError(f"`lowpass_kernel` must have a positive sum to be normalised, got {kernel!r}.")
    if len(values) % 2 == 0:
        raise ConfigError(
            f"`lowpass_kernel` must have an odd length (centred filter), got length {len(values)}: {kernel!r}."
        )
    return values
