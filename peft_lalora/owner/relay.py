"""The caller's side of the private trainer's socket with torch tensors, for another engine's client (Flower's
ClientApp relays with the torch-free `peft_lalora_relay`, which this builds on). Flower-free.
"""

from __future__ import annotations

from safetensors.torch import save as save_tensors

from peft_lalora_relay import codes
from peft_lalora_relay import relay as light
from peft_lalora_relay.wire import WireError

from .local_round import Reply
from .wire import tensors_of


class TrainerRelay(light.TrainerRelay):
    """The torch-free relay's caller (same arguments) with tensors in and a `local_round.Reply` out."""

    def train(self, *, run_id, round_idx, lr, steps, run_config, global_state) -> Reply:
        """One local round at the trainer: its `Reply` (released tensors and records, or a refusal)."""
        payload = save_tensors({k: v.contiguous() for k, v in global_state.items()}) if global_state else b""
        released = self.release(
            run_id=run_id, round_idx=round_idx, lr=lr, steps=steps, run_config=run_config, payload=payload
        )
        if not released.ok:
            return Reply(code=released.code, text=released.text)
        try:
            delta = tensors_of(released.payload)
        except WireError as exc:
            return Reply(code=codes.TRAINER_UNAVAILABLE, text=f"The private trainer's reply is unreadable: {exc}")
        return Reply(delta=delta, metrics=released.metrics, privacy=released.privacy)
