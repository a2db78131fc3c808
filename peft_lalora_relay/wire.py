"""The private trainer's wire format: one frame per message, nothing that executes code (no pickle).

    frame   = MAGIC (4 bytes, b"LLR1") | header length (4 bytes, big-endian) | header | payload
    header  = UTF-8 JSON object (at most `MAX_HEADER_BYTES`; NaN and Infinity refused); its `payload-bytes` (an
              integer >= 0, at most the receiver's cap) is the payload's length
    payload = safetensors bytes (the tensors by name), or nothing when `payload-bytes` is 0

Here the payload travels as bytes: the relay passes it through (numpy on its side), the trainer reads it as torch
tensors (`peft_lalora.owner.wire`). A frame that breaks any of this raises `WireError` (code `codes.BAD_REQUEST`)
before its payload is read; a peer that closes the socket half-way raises `ConnectionClosed`.
"""

from __future__ import annotations

import json
import socket
import struct

from . import codes

MAGIC = b"LLR1"
PROTOCOL = "peft_lalora.owner/1"
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30  # 1 GiB of adapter tensors (float32)


class WireError(ValueError):
    """A message that cannot be read: `code` of `codes`, `text` for the error reply."""

    def __init__(self, text: str, code: int = codes.BAD_REQUEST):
        super().__init__(text)
        self.code = code


class ConnectionClosed(ConnectionError):
    """The peer closed the socket before the whole message arrived."""


def _refuse_constant(name: str):
    raise WireError(f"The header holds {name}, which JSON does not allow: send finite numbers.")


def recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionClosed(f"the peer closed the socket with {left} of {size} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send_bytes(sock: socket.socket, header: dict, payload: bytes = b"") -> None:
    """Send `header` (a JSON object; `payload-bytes` is set here) and `payload` (safetensors bytes, or b"")."""
    body = json.dumps({**header, "payload-bytes": len(payload)}, allow_nan=False).encode()
    sock.sendall(MAGIC + struct.pack(">I", len(body)) + body)
    if payload:
        sock.sendall(payload)


def recv_bytes(sock: socket.socket, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> tuple[dict, bytes]:
    """Read one frame: (header, payload bytes). Raises `WireError` for a bad frame, `ConnectionClosed` if cut short."""
    prefix = recv_exact(sock, 8)
    if prefix[:4] != MAGIC:
        raise WireError(f"The message does not start with {MAGIC!r}: not a {PROTOCOL} frame.")
    (size,) = struct.unpack(">I", prefix[4:])
    if size > MAX_HEADER_BYTES:
        raise WireError(f"The header is {size} bytes, above the cap of {MAX_HEADER_BYTES} bytes.")
    try:
        header = json.loads(recv_exact(sock, size).decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"The header is not UTF-8 JSON: {exc}.") from None
    if not isinstance(header, dict):
        raise WireError(f"The header must be a JSON object, got {type(header).__name__}.")
    length = header.get("payload-bytes", 0)
    if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= max_payload_bytes:
        raise WireError(
            f"`payload-bytes` must be an integer in [0, {max_payload_bytes}] (the receiver's cap), got {length!r}."
        )
    return header, (recv_exact(sock, length) if length else b"")
