"""The private trainer's wire format with torch tensors (the framing itself, caps included, is
`peft_lalora_relay.wire`, which the torch-free relay ClientApp shares): `send_frame` / `recv_frame` turn the
safetensors payload into tensors by name. A payload that is not safetensors raises `WireError`.
"""

from __future__ import annotations

import socket

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from peft_lalora_relay.wire import DEFAULT_MAX_PAYLOAD_BYTES, WireError, recv_bytes, send_bytes


def send_frame(sock: socket.socket, header: dict, tensors: dict | None = None) -> None:
    """Send `header` (a JSON object; `payload-bytes` is set here) and `tensors` (name -> contiguous tensor)."""
    send_bytes(sock, header, save_tensors(tensors) if tensors else b"")


def recv_frame(sock: socket.socket, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> tuple[dict, dict]:
    """Read one frame: (header, tensors). Raises `WireError` for a bad frame, `ConnectionClosed` if cut short."""
    header, payload = recv_bytes(sock, max_payload_bytes)
    return header, tensors_of(payload)


def tensors_of(payload: bytes) -> dict:
    """The tensors of a safetensors payload ({} for none); `WireError` for bytes that are not safetensors."""
    try:
        return load_tensors(payload) if payload else {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on bad bytes
        raise WireError(f"The payload is not safetensors bytes ({type(exc).__name__}).") from None
