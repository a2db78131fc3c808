"""A Flower `Grid` test double: runs the real ClientApp for every message, in this process (no Ray, no SuperLink).

Each node has its own `Context` (node_config, state), as a SuperNode would. Flower 1.42 stamps the sender's
identity on every `Message` built outside its runtime, so the double sets `TaskIdentity` first.
"""

from __future__ import annotations

import itertools

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from peft_lalora.flower import protocol

SERVER_NODE_ID = 0
CLIENT_APP_RAISED_EXCEPTION = 2  # flwr's ErrorCode for a ClientApp that raised


class InProcessGrid(Grid):
    """`nodes`: {node id: node_config}. `offline`: node ids that are registered but never answer; `lifetimes`:
    {node id: train messages it answers before it dies (stays registered, never answers again)}.
    `on_reply(node_id, message, reply)` is called after each ClientApp call (e.g. to inspect its disk)."""

    def __init__(self, client_app, nodes: dict, run_config: dict, *, run_id: int = 1, on_reply=None):
        self.client_app = client_app
        self.run_config = dict(run_config)
        self.run_id = run_id
        self.contexts = {n: Context(run_id, n, dict(cfg), RecordDict(), dict(run_config)) for n, cfg in nodes.items()}
        self.offline: set = set()
        self.lifetimes: dict = {}
        self.on_reply = on_reply
        self.sent: list = []  # (node id, message type) of every message pushed
        self._replies: dict = {}
        self._ids = itertools.count(1)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SERVER_NODE_ID

    def server_context(self) -> Context:
        return Context(self.run_id, SERVER_NODE_ID, {}, RecordDict(), dict(self.run_config))

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = f"msg-{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            node = message.metadata.dst_node_id
            self.sent.append((node, message.metadata.message_type))
            ids.append(message_id)
            if message.metadata.message_type == "train" and self.lifetimes.get(node, 1) <= 0:
                self.offline.add(node)
            if node in self.offline:
                continue
            if message.metadata.message_type == "train" and node in self.lifetimes:
                self.lifetimes[node] -= 1
            try:
                reply = self.client_app(message, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - what a SuperNode does with a ClientApp that raises
                reply = Message(Error(CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=message)
            reply.metadata.__dict__["_message_id"] = f"reply-{message_id}"
            if self.on_reply is not None:
                self.on_reply(node, message, reply)
            self._replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))


def train_message(global_state: dict, node_id: int, *, round_idx: int = 0, lr: float = 0.5, steps: int = 2):
    """A server's train message for one node, as `LALoraStrategy.configure_train` builds it (public seed 0)."""
    config = ConfigRecord({"round": round_idx, "learning-rate": lr, "local-steps": steps, "seed": 0})
    content = RecordDict({protocol.GLOBAL: protocol.pack_state(global_state), protocol.CONFIG: config})
    return Message(content, dst_node_id=node_id, message_type="train")
