"""The data owner's private trainer: a long-lived process next to a SuperNode (or any other engine's client) that
alone reads the data and the secret, trains under DP, charges its ledger and releases only noised updates within
its policy. It keeps the model of each run in memory across rounds (`local_round.open_job`). Flower-free.

Requests (one per connection, `wire` frames; every request header holds `protocol` = `PROTOCOL` of
`peft_lalora_relay.wire` and `token`, the shared token, compared with `hmac.compare_digest`):
    {"type": "describe"}                       -> {"ok": true, "partition-id": n}
    {"type": "train", "run-id": int, "round": int, "learning-rate": float, "local-steps": int,
     "run-config": {key: str | int | float | bool}} + the global adapter (safetensors)
        -> {"ok": true, "metrics": {...}, "privacy": {...}} + the delta (safetensors)
Any refusal is {"ok": false, "code": int (`peft_lalora_relay.codes`), "error": str}. A bad frame, a wrong token, or
a round before one this run already trained (in memory, or on the ledger) is refused before anything is loaded or
charged. The run config is the caller's: the trainer checks it against its own policy (`NodePolicy`), exactly as
the in-ClientApp mode does.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import os
import socket
import threading
import time

from peft_lalora_relay import codes
from peft_lalora_relay.wire import DEFAULT_MAX_PAYLOAD_BYTES, PROTOCOL, ConnectionClosed, WireError

from .config import DEFAULT_MAX_MODELS, DEFAULT_REQUEST_TIMEOUT_S, check_folder
from .local_round import Reply, local_round, partition_id
from .state import ClientState
from .task import TrainingTask
from .wire import recv_frame, send_frame

logger = logging.getLogger(__name__)


class PrivateTrainer:
    """
    Args:
        task (`TrainingTask`): builds the model and reads the data.
        node_config (`dict`): `partition-id`, `state-dir`, the data's keys, the policy keys (see `local_round`).
        socket_path (`str`): where to listen; its folder must pass `config.check_folder`.
        token (`str`): the shared token a caller must present.
        max_payload_bytes (`int`): the largest request payload read.
        max_models (`int`): models held in memory at most (the least recently used run's goes first).
        request_timeout_s (`float`): a caller must send its whole request within this time, or it is dropped
            (requests are served one at a time: a caller that stalls holds the others back this long at most).
    """

    def __init__(
        self,
        task,
        node_config,
        socket_path,
        token,
        max_payload_bytes=DEFAULT_MAX_PAYLOAD_BYTES,
        max_models=DEFAULT_MAX_MODELS,
        request_timeout_s=DEFAULT_REQUEST_TIMEOUT_S,
    ):
        self.task: TrainingTask = task
        self.node_config = dict(node_config)
        self.client = partition_id(self.node_config)
        self.socket_path = os.path.abspath(socket_path)
        self.token = token
        self.max_payload_bytes = int(max_payload_bytes)
        self.max_models = int(max_models)
        self.request_timeout_s = float(request_timeout_s)
        self.last_round: dict = {}  # run id -> the last round this trainer released for it
        self.run_configs: dict = {}  # run id -> the run config its charged rounds trained with
        self.stopped = threading.Event()
        self._listener = None
        self._inode = None

    # ----- the socket ---------------------------------------------------------------------------------------
    def bind(self) -> None:
        check_folder(os.path.dirname(self.socket_path))
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # a previous trainer's socket (the folder is this user's own)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o660)
        self._inode = os.stat(self.socket_path).st_ino  # a successor may bind the same path: unlink only ours
        listener.listen(4)
        listener.settimeout(0.5)
        self._listener = listener
        logger.info("private trainer of client %d listening on %s", self.client, self.socket_path)

    def serve_forever(self) -> None:
        """Answer requests one at a time until `stop()`; a caller's failure never stops the trainer."""
        if self._listener is None:
            self.bind()
        try:
            while not self.stopped.is_set():
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    self.serve_connection(conn)
        finally:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.socket_path).st_ino == self._inode:
                    os.unlink(self.socket_path)

    def stop(self) -> None:
        self.stopped.set()

    def serve_connection(self, conn: socket.socket) -> None:
        try:
            header, tensors = recv_frame(_Deadline(conn, self.request_timeout_s), self.max_payload_bytes)
            reply_header, reply_tensors = self.handle(header, tensors)
        except WireError as exc:
            reply_header, reply_tensors = _refusal(exc.code, str(exc))
        except (ConnectionClosed, TimeoutError, OSError) as exc:
            logger.warning("a caller went away mid-request (%s): nothing done", exc)
            return
        try:
            conn.settimeout(self.request_timeout_s)  # a caller that does not read its reply is dropped as well
            send_frame(conn, reply_header, reply_tensors)
        except OSError as exc:  # the caller died while this trainer worked: a charge made stays on the ledger
            logger.warning("could not answer the caller (%s); what was charged stays charged", exc)

    # ----- the requests -------------------------------------------------------------------------------------
    def handle(self, header: dict, tensors: dict) -> tuple[dict, dict | None]:
        if header.get("protocol") != PROTOCOL:
            return _refusal(codes.BAD_REQUEST, f"`protocol` must be {PROTOCOL!r}, got {header.get('protocol')!r}.")
        token = header.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self.token.encode()):
            logger.warning("refused a request without the right token")
            return _refusal(codes.UNAUTHORIZED, "`token` does not match this private trainer's token file.")
        kind = header.get("type")
        if kind == "describe":
            return {"protocol": PROTOCOL, "ok": True, "partition-id": self.client}, None
        if kind != "train":
            return _refusal(codes.BAD_REQUEST, f"`type` must be 'train' or 'describe', got {kind!r}.")
        request = _train_request(header)
        run_id, round_idx, config = request["run-id"], request["round"], request["run-config"]
        last = max(self.last_round.get(run_id, -1), self._last_charged(run_id))
        if round_idx < last:
            text = f"`round` {round_idx} comes after round {last} of run {run_id}: rounds only advance."
            return _refusal(codes.OUT_OF_ORDER, text)
        held = self.run_configs.get(run_id, config)
        if held != config:
            changed = sorted(k for k in held.keys() | config.keys() if held.get(k) != config.get(k))
            text = f"`run-config` of run {run_id} changed after it trained (keys {changed}): a run keeps one config."
            return _refusal(codes.RUN_CONFIG_CHANGED, text + " Start a new run for another config.")
        reply = local_round(
            self.task,
            run_id=run_id,
            node_id=0,
            run_config=config,
            node_config=self.node_config,
            round_idx=round_idx,
            lr=request["learning-rate"],
            steps=request["local-steps"],
            global_state=tensors,
            max_models=self.max_models,
        )
        if reply.code not in codes.NOT_CHARGED:
            self.last_round[run_id] = round_idx  # charged (released, or failed after the charge)
            self.run_configs[run_id] = dict(config)
        return _reply(reply)

    def _last_charged(self, run_id: int) -> int:
        """The last round of run `run_id` on the ledger (a restarted trainer remembers it), or -1."""
        state_dir = self.node_config.get("state-dir")
        saved = ClientState(state_dir).saved() if isinstance(state_dir, str) and state_dir else None
        rounds = [c["round"] for c in (saved or {}).get("charges", []) if c.get("run_id") == run_id]
        return max(rounds, default=-1)


class _Deadline:
    """A socket whose reads share one deadline (`recv_frame` reads in many calls; a per-call timeout would let a
    caller that sends one byte at a time hold the trainer for ever)."""

    def __init__(self, conn: socket.socket, seconds: float):
        self.conn, self.deadline, self.seconds = conn, time.monotonic() + seconds, seconds

    def recv(self, size: int) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the request was not complete within `request-timeout-s` = {self.seconds} s")
        self.conn.settimeout(left)
        return self.conn.recv(size)


def _train_request(header: dict) -> dict:
    out = {}
    for key, kind in (("run-id", int), ("round", int), ("local-steps", int), ("learning-rate", float)):
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise WireError(f"`{key}` must be {'a number' if kind is float else 'an integer'}, got {value!r}.")
        if kind is float and not (math.isfinite(value) and value > 0):
            raise WireError(f"`{key}` must be a finite number > 0, got {value!r}.")
        if kind is int and value < 0:
            raise WireError(f"`{key}` must be >= 0, got {value!r}.")
        out[key] = kind(value)
    config = header.get("run-config")
    if not isinstance(config, dict) or not all(
        isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in config.items()
    ):
        raise WireError("`run-config` must be an object of run-config keys to strings, numbers or booleans.")
    out["run-config"] = config
    return out


def _refusal(code: int, text: str) -> tuple[dict, None]:
    return {"protocol": PROTOCOL, "ok": False, "code": int(code), "error": text}, None


def _reply(reply: Reply) -> tuple[dict, dict | None]:
    if not reply.ok:
        return _refusal(reply.code, reply.text)
    metrics = {k: (v if math.isfinite(v) else None) for k, v in reply.metrics.items()}  # JSON has no inf (dp=false)
    return {"protocol": PROTOCOL, "ok": True, "metrics": metrics, "privacy": reply.privacy}, reply.delta
