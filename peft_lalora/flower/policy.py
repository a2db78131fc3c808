"""Moved to `peft_lalora.owner.policy` (Flower-free: the private trainer checks the same policy)."""

from ..owner.policy import DEFAULT_MAX_DELTA, DEFAULT_MAX_EPSILON, NodePolicy

__all__ = ["DEFAULT_MAX_DELTA", "DEFAULT_MAX_EPSILON", "NodePolicy"]
