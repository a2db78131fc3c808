"""Moved to `peft_lalora.owner.run_config` (Flower-free: the private trainer reads the same run config)."""

from ..owner.run_config import ALIASES, FIELDS, SERVER_KEYS, check_keys, federated_args, field_of, server_setting

__all__ = ["ALIASES", "FIELDS", "SERVER_KEYS", "check_keys", "federated_args", "field_of", "server_setting"]
