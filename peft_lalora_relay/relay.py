"""The caller's side of the private trainer's socket (a Flower ClientApp in relay mode, or another engine's client):
it forwards the global adapter and the round's request and gets back only what the trainer releases. The adapter
travels as safetensors bytes both ways: this module never decodes them (see `client_app` for numpy,
`peft_lalora.owner.relay` for torch). Flower-free, torch-free.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from . import codes
from .token import TokenFileError, read_token
from .wire import PROTOCOL, ConnectionClosed, WireError, recv_bytes, send_bytes

DEFAULT_TIMEOUT_S = 24 * 3600.0  # a local round may take long; the trainer answers or closes
REPLY_CAP_BYTES = 1 << 40  # the trainer is the owner's own process: its reply is read whole


class TrainerUnavailable(ConnectionError):
    """The private trainer could not be reached, or closed the socket before it answered."""


@dataclass
class Released:
    """What the trainer released for one round: `payload` (the delta, safetensors bytes), `metrics`, `privacy`;
    or a refusal (`code` of `codes`, `text`)."""

    payload: bytes = b""
    metrics: dict = field(default_factory=dict)
    privacy: dict = field(default_factory=dict)
    code: int = 0
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0


class TrainerRelay:
    """
    Args:
        socket_path (`str`): the private trainer's Unix socket (the node config's `private-trainer`).
        token_path (`str`): the shared token file (the node config's `private-trainer-token`).
        timeout (`float`): seconds to wait for a reply.
    """

    def __init__(self, socket_path: str, token_path: str, timeout: float = DEFAULT_TIMEOUT_S):
        self.socket_path = socket_path
        self.token_path = token_path
        self.timeout = timeout

    def request(self, header: dict, payload: bytes = b"") -> tuple[dict, bytes]:
        """Send one request (the token and protocol added) and return the reply's (header, payload). Raises
        `TokenFileError` for an unreadable token file, `TrainerUnavailable` for a trainer that does not answer."""
        token = read_token(self.token_path)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(self.timeout)
                conn.connect(self.socket_path)
                send_bytes(conn, {"protocol": PROTOCOL, "token": token, **header}, payload)
                return recv_bytes(conn, max_payload_bytes=REPLY_CAP_BYTES)
        except (ConnectionClosed, OSError, WireError) as exc:
            raise TrainerUnavailable(
                f"The private trainer at `private-trainer`={self.socket_path!r} did not answer "
                f"({type(exc).__name__}: {exc}). Is `lalora-private-trainer` running, and may this user open its socket?"
            ) from None

    def describe(self) -> int:
        """The trainer's client id (`partition-id`)."""
        header, _ = self.request({"type": "describe"})
        if not header.get("ok"):
            raise TrainerUnavailable(f"The private trainer refused `describe`: {header.get('error')}")
        return int(header["partition-id"])

    def release(self, *, run_id, round_idx, lr, steps, run_config, payload: bytes) -> Released:
        """One local round at the trainer, the global adapter given as safetensors bytes: what it released."""
        request = {
            "type": "train",
            "run-id": int(run_id),
            "round": int(round_idx),
            "learning-rate": float(lr),
            "local-steps": int(steps),
            "run-config": dict(run_config),
        }
        try:
            header, reply = self.request(request, payload)
        except TrainerUnavailable as exc:
            return Released(code=codes.TRAINER_UNAVAILABLE, text=str(exc))
        except TokenFileError as exc:
            return Released(code=codes.CLIENT_CONFIG, text=str(exc))
        except (TypeError, ValueError) as exc:  # a run-config value JSON cannot carry (nothing was sent)
            return Released(code=codes.CLIENT_CONFIG, text=f"The request cannot be sent: {type(exc).__name__}: {exc}")
        if not header.get("ok"):
            return Released(code=int(header.get("code", codes.BAD_REQUEST)), text=str(header.get("error", "")))
        metrics = {k: (float("inf") if v is None else v) for k, v in header.get("metrics", {}).items()}
        return Released(payload=reply, metrics=metrics, privacy=dict(header.get("privacy", {})))
