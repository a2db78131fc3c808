"""Which tensor is what: the one place that says whether a parameter is LoRA's A, LoRA's B or the trainable
head (`modules_to_save`), from its name in `model.named_parameters()` (or a module's name)."""

from __future__ import annotations

import functools
from typing import Optional

# role -> the name part peft gives the tensor's module
ROLE_PARTS = {"A": "lora_A", "B": "lora_B", "head": "modules_to_save"}
FACTOR_ROLES = ("A", "B")


@functools.lru_cache(maxsize=1 << 16)  # a model's few hundred names, looked up at every client of every round
def tensor_role(name: str, adapter_name: Optional[str] = None) -> Optional[str]:
    """`"A"`, `"B"`, `"head"` or None (a base-model tensor) for a parameter or module name; with `adapter_name`,
    only that adapter's tensors have a role (peft names them `...lora_A.<adapter>.weight`)."""
    parts = name.split(".")
    for role, part in ROLE_PARTS.items():
        for i, found in enumerate(parts[:-1] if adapter_name is not None else parts):
            if found == part and i > 0 and (adapter_name is None or parts[i + 1] == adapter_name):
                return role
    return None


def adapter_tensor_names(model, adapter_name: str = "default") -> list:
    """The tensors the federation trains and exchanges: A, B and the head of `adapter_name`, in model order."""
    return [name for name, _ in model.named_parameters() if tensor_role(name, adapter_name) is not None]


def factor_names(model, adapter_name: str = "default") -> dict:
    """Parameter name -> "A" / "B" for the adapter's LoRA weights."""
    roles = {name: tensor_role(name, adapter_name) for name, _ in model.named_parameters()}
    return {name: role for name, role in roles.items() if role in FACTOR_ROLES}


def trained_tensor_names(names, adapter_name: str, factors) -> list:
    """The tensors of `names` that a client training the LoRA `factors` sends: those factors' and the head's."""
    return [
        n for n in names if tensor_role(n, adapter_name) not in FACTOR_ROLES or tensor_role(n, adapter_name) in factors
    ]
