"""The caller's side of the private trainer's socket (a Flower ClientApp in relay mode, or another engine's client):
it forwards the global adapter and the round's request and gets back only what the trainer releases. Flower-free.
"""

from __future__ import annotations

import socket

from . import codes
from .config import read_token
from .local_round import Reply
from .wire import PROTOCOL, ConnectionClosed, WireError, recv_frame, send_frame

DEFAULT_TIMEOUT_S = 24 * 3600.0  # a local round may take long; the trainer answers or closes


class TrainerUnavailable(ConnectionError):
    """The private trainer could not be reached, or closed the socket before it answered."""


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

    def request(self, header: dict, tensors: dict | None = None) -> tuple[dict, dict]:
        """Send one request (the token and protocol added) and return the reply's (header, tensors)."""
        token = read_token(self.token_path)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(self.timeout)
                conn.connect(self.socket_path)
                send_frame(conn, {"protocol": PROTOCOL, "token": token, **header}, tensors)
                return recv_frame(conn, max_payload_bytes=1 << 40)
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

    def train(self, *, run_id, round_idx, lr, steps, run_config, global_state) -> Reply:
        """One local round at the trainer: its `Reply` (released tensors and records, or a refusal)."""
        request = {
            "type": "train",
            "run-id": int(run_id),
            "round": int(round_idx),
            "learning-rate": float(lr),
            "local-steps": int(steps),
            "run-config": dict(run_config),
        }
        try:
            header, tensors = self.request(request, {k: v.contiguous() for k, v in global_state.items()})
        except TrainerUnavailable as exc:
            return Reply(code=codes.TRAINER_UNAVAILABLE, text=str(exc))
        except (TypeError, ValueError) as exc:  # a run-config value JSON cannot carry (nothing was sent)
            return Reply(code=codes.CLIENT_CONFIG, text=f"The request cannot be sent: {type(exc).__name__}: {exc}")
        if not header.get("ok"):
            return Reply(code=int(header.get("code", codes.BAD_REQUEST)), text=str(header.get("error", "")))
        metrics = {k: (float("inf") if v is None else v) for k, v in header.get("metrics", {}).items()}
        return Reply(delta=tensors, metrics=metrics, privacy=dict(header.get("privacy", {})))
