"""The light ClientApp: relays to the data owner's private trainer without importing torch, transformers or peft.

Flower starts one `flwr-clientapp` process per message; a node in relay mode (`private-trainer` and
`private-trainer-token` in its node config, see `peft_lalora.flower.client_app`) pays here only for flwr, numpy and
safetensors: the global adapter's safetensors bytes go from Flower's packed record (`packed`) to the trainer, and the
trainer's reply back the same way (read once here, to refuse bytes that are not safetensors). A node in trial mode (no `private-trainer`) gets `peft_lalora.flower`'s
ClientApp for `trial_task`, imported on its first message: the same answers as `peft_lalora.flower.make_client_app`.

    client_app = make_client_app(trial_task="lalora_rt.task:TASK")   # clientapp = "lalora_rt.client:client_app"
"""

from __future__ import annotations

import functools
import importlib
import logging
import time

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.numpy import load as load_arrays

from . import codes
from .packed import pack, unpack
from .records import CONFIG, DELTA, GLOBAL, METRICS, NODE, PRIVACY
from .relay import TrainerRelay, TrainerUnavailable
from .token import TokenFileError

logger = logging.getLogger(__name__)
RELAY_KEYS = ("private-trainer", "private-trainer-token")


class RelayConfigError(ValueError):
    """The node config names a private trainer incompletely (the message says how to fix it)."""


def make_client_app(trial_task: str | None = None) -> ClientApp:
    """A `ClientApp` that relays to the node's private trainer, or (trial mode) runs `trial_task` (`module:attr`
    of a `FlowerTask`) through `peft_lalora.flower.make_client_app`; None: relay mode only."""
    if trial_task is not None and (not isinstance(trial_task, str) or ":" not in trial_task):
        raise ValueError(
            f"`trial_task` must be 'module:attribute' of a FlowerTask (e.g. 'lalora_rt.task:TASK'), got {trial_task!r}."
        )
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        reply = relay_query(message, context)
        return reply if reply is not None else _trial(trial_task, message, context)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        reply = relay_train(message, context)
        return reply if reply is not None else _trial(trial_task, message, context)

    return app


def relay_of(node_config) -> TrainerRelay | None:
    """The private trainer this node relays to, or None (trial mode)."""
    given = [k for k in RELAY_KEYS if k in node_config]
    if not given:
        return None
    if len(given) < len(RELAY_KEYS) or not all(isinstance(node_config[k], str) and node_config[k] for k in RELAY_KEYS):
        raise RelayConfigError(
            f"Relay mode needs both {RELAY_KEYS} as paths in the node config, got "
            f"{ {k: node_config.get(k) for k in RELAY_KEYS} }. Start the SuperNode with --node-config "
            '\'private-trainer="/run/lalora/trainer.sock" private-trainer-token="/run/lalora/token"\'.'
        )
    return TrainerRelay(node_config["private-trainer"], node_config["private-trainer-token"])


def relay_query(message: Message, context: Context) -> Message | None:
    """The trainer's client id (relay mode), or None when this node is in trial mode."""
    try:
        relay = relay_of(context.node_config)
        if relay is None:
            return None
        client = relay.describe()
    except (RelayConfigError, TokenFileError, TrainerUnavailable) as exc:
        return Message(Error(codes.CLIENT_CONFIG, str(exc)), reply_to=message)
    return Message(RecordDict({NODE: ConfigRecord({"partition-id": client})}), reply_to=message)


def relay_train(message: Message, context: Context) -> Message | None:
    """One round at the node's private trainer (relay mode), or None when this node is in trial mode."""
    started = time.perf_counter()
    try:
        relay = relay_of(context.node_config)
        if relay is None:
            return None
        config = message.content[CONFIG]
        round_idx, lr, steps = int(config["round"]), float(config["learning-rate"]), int(config["local-steps"])
        payload = unpack(message.content[GLOBAL])
    except (RelayConfigError, KeyError, TypeError, ValueError) as exc:
        return Message(Error(codes.CLIENT_CONFIG, f"{type(exc).__name__}: {exc}"), reply_to=message)
    released = relay.release(
        run_id=context.run_id,
        round_idx=round_idx,
        lr=lr,
        steps=steps,
        run_config=dict(context.run_config),
        payload=payload,
    )
    asked = time.perf_counter()
    if not released.ok:
        return Message(Error(released.code, released.text), reply_to=message)
    try:
        tensors = len(load_arrays(released.payload)) if released.payload else 0
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on bad bytes
        text = f"The private trainer's reply is not safetensors of numpy dtypes ({type(exc).__name__}: {exc})."
        return Message(Error(codes.TRAINER_UNAVAILABLE, text), reply_to=message)
    delta = pack(released.payload)
    metrics = {**released.metrics, "bytes-sent": int(delta.count_bytes())}
    logger.info(
        "round %s: relayed in %.3f s (trainer %.3f s); sends %d tensors (%d bytes)",
        round_idx,
        time.perf_counter() - started,
        asked - started,
        tensors,
        metrics["bytes-sent"],
    )
    content = RecordDict({DELTA: delta, METRICS: MetricRecord(metrics), PRIVACY: ConfigRecord(released.privacy)})
    return Message(content, reply_to=message)


def _trial(trial_task: str | None, message: Message, context: Context) -> Message:
    if trial_task is None:
        text = (
            f"This ClientApp only relays: the node config must name its private trainer with {RELAY_KEYS} "
            '(--node-config \'private-trainer="/run/lalora/trainer.sock" private-trainer-token="/run/lalora/token"\').'
        )
        return Message(Error(codes.CLIENT_CONFIG, text), reply_to=message)
    return _trial_app(trial_task)(message, context)


@functools.cache
def _trial_app(trial_task: str) -> ClientApp:
    """`peft_lalora.flower`'s ClientApp for the task `module:attr` (imported here, in trial mode only)."""
    from peft_lalora.flower import make_client_app as make_trial_app

    module, _, attr = trial_task.partition(":")
    return make_trial_app(getattr(importlib.import_module(module), attr))
