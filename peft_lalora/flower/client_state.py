"""Moved to `peft_lalora.owner.state` (Flower-free: the private trainer keeps the same ledger)."""

from ..owner.state import LEDGER_FILE, LOCK_FILE, SECRET_FILE, ClientState, release_seed

__all__ = ["LEDGER_FILE", "LOCK_FILE", "SECRET_FILE", "ClientState", "release_seed"]
