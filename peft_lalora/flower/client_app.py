"""The ClientApp: one SuperNode, one client, in one of two modes.

Relay mode (the data owner's guarantee): the node config names a private trainer, `private-trainer` (its Unix
socket) and `private-trainer-token` (the shared token file). The ClientApp then never builds the model, opens the
data or the ledger: it forwards the global adapter and the round's request (round, learning rate, local steps, the
run config) to the owner's `lalora-private-trainer` (`peft_lalora.owner`) and returns its reply, which holds only
what the trainer's own policy releases. Whatever code the server ships as the ClientApp, it gets nothing else.

Trial mode (trusts the server's code): without `private-trainer`, this process does what the private trainer does
(`owner.local_round`): it checks the run against the node's privacy policy, loads its own data, charges its ledger
and trains. The ClientApp is code that travels with each run (`flwr run` ships it), so whoever writes the run can
edit every one of these checks away and read the data folder: use this mode for trials, or with runs you review.

Node config (`flower-supernode --node-config '...'`): in relay mode `private-trainer` and `private-trainer-token`;
in trial mode the keys of `owner.local_round`. A refused run gets an error reply with a `peft_lalora_relay.codes`.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from peft_lalora_relay.client_app import RELAY_KEYS, relay_query, relay_train

from ..errors import ConfigError
from ..owner.local_round import Reply, local_round
from ..owner.task import TrainingTask
from . import protocol

logger = logging.getLogger(__name__)
__all__ = ["RELAY_KEYS", "make_client_app", "train_round"]


def make_client_app(task: TrainingTask) -> ClientApp:
    """A `ClientApp` that answers the server's queries and runs `task`'s client updates, or relays them (an app
    whose nodes relay should name `peft_lalora_relay.client_app`'s torch-free ClientApp in its `pyproject.toml`)."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        reply = relay_query(message, context)
        if reply is not None:
            return reply
        try:
            client = protocol.partition_id(context.node_config)
        except ConfigError as exc:
            return Message(Error(protocol.CLIENT_CONFIG, str(exc)), reply_to=message)
        return Message(RecordDict({protocol.NODE: ConfigRecord({"partition-id": client})}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        reply = relay_train(message, context)
        return reply if reply is not None else train_round(task, message, context)

    return app


def train_round(task: TrainingTask, message: Message, context: Context) -> Message:
    """One round of this client in trial mode: this process checks the policy, charges its ledger and trains."""
    config = message.content[protocol.CONFIG]
    try:
        round_idx, lr, steps = int(config["round"]), float(config["learning-rate"]), int(config["local-steps"])
        global_state = protocol.state_of(message.content[protocol.GLOBAL])
    except (KeyError, TypeError, ValueError) as exc:  # WireError is a ValueError
        return Message(Error(protocol.CLIENT_CONFIG, f"{type(exc).__name__}: {exc}"), reply_to=message)
    reply = local_round(
        task,
        node_id=context.node_id,
        node_config=dict(context.node_config),
        run_id=context.run_id,
        round_idx=round_idx,
        lr=lr,
        steps=steps,
        run_config=dict(context.run_config),
        global_state=global_state,
    )
    return _message(reply, message)


def _message(reply: Reply, message: Message) -> Message:
    if not reply.ok:
        return Message(Error(reply.code, reply.text), reply_to=message)
    delta = protocol.pack_state(reply.delta)
    metrics = {**reply.metrics, "bytes-sent": int(delta.count_bytes())}
    round_idx = message.content[protocol.CONFIG].get("round")
    logger.info("round %s: sends %d tensors (%d bytes)", round_idx, len(reply.delta), metrics["bytes-sent"])
    content = RecordDict(
        {protocol.DELTA: delta, protocol.METRICS: MetricRecord(metrics), protocol.PRIVACY: ConfigRecord(reply.privacy)}
    )
    return Message(content, reply_to=message)
