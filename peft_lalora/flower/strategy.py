"""`LALoraStrategy`: a Flower `Strategy` that runs `FederatedDPTrainer`'s rounds through the same
`federated.round.RoundPolicy` (selection over the SuperNodes' `partition-id`s, aggregation in client order, a round
below quorum aborted). The server holds no sample-level privacy state: each client accounts for itself and reports.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..federated.round import RoundPolicy, finite_mean
from ..training_arguments import round_learning_rates
from . import protocol
from .outcome import QuorumUnreachable

logger = logging.getLogger(__name__)
NO_REPLY = "no reply within the round's timeout"
QUERY_TIMEOUT_S = 120.0  # to wait for the SuperNodes' answers to "which partition are you?"


class LALoraStrategy(Strategy):
    """
    Args:
        args (`FederatedDPArguments`): the run's settings (see `owner.run_config.federated_args`).
        global_state (`dict[str, Tensor]`): the initial adapter tensors (A, B and the head), by parameter name.
        round_timeout (`float`): seconds to wait for a round's replies (also the messages' time to live).
        max_aborted_rounds (`int`): stop the run (`QuorumUnreachable`) after this many consecutive aborted rounds,
            since each one may have charged its survivors for nothing; 0 never stops.
        on_round (`callable`, *optional*): called with the history after every round (e.g. to write it to disk).
        private_root, round_tensors: client-level DP only (`RoundPolicy`): the server's secret root and
            round -> the tensors its clients train.
    """

    def __init__(
        self,
        *,
        args,
        global_state: dict,
        round_timeout: float = 3600.0,
        max_aborted_rounds: int = 2,
        on_round=None,
        private_root=None,
        round_tensors=None,
    ):
        self.args = args
        self.global_state = {n: t.detach().to("cpu", torch.float32).clone() for n, t in global_state.items()}
        self.learning_rates = round_learning_rates(args)
        self.round_timeout = float(round_timeout)
        self.nodes: dict[int, int] = {}  # partition id -> node id
        self._asked: set[int] = set()  # nodes that told us their partition id
        self.history: list[dict] = []  # one record per round
        self.clients: dict[int, dict] = {}  # partition id -> its last privacy report
        self.unreported: dict[int, list] = {}  # partition id -> rounds it may have charged without reporting
        self.refused: list[dict] = []  # refusals: over a client's budget, or against its node's policy
        self.max_aborted_rounds, self.on_round = int(max_aborted_rounds), on_round
        self._round: dict = {}
        self._uncharged: set = set()
        self.policy = RoundPolicy(args, private_root=private_root, round_tensors=round_tensors)

    def arrays(self) -> ArrayRecord:
        return protocol.pack_state(self.global_state)

    # ----- which SuperNode is which client ------------------------------------------------------------------
    def discover(self, grid: Grid, *, wait: float = 0.0, until: int | None = None) -> dict:
        """Ask every node not asked yet for its `partition-id`; with `until`, keep asking new nodes for up to
        `wait` seconds until that many partitions have a node. Returns {partition id: node id}."""
        deadline = time.time() + wait
        while True:
            fresh = [n for n in grid.get_node_ids() if n not in self._asked]
            if fresh:
                self._ask(grid, fresh)
            if until is None or len(self.nodes) >= until or time.time() >= deadline:
                return dict(self.nodes)
            time.sleep(min(1.0, max(0.0, deadline - time.time())))

    def _ask(self, grid: Grid, nodes: list) -> None:
        messages = [
            Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY, ttl=QUERY_TIMEOUT_S) for n in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=QUERY_TIMEOUT_S))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for reply in replies:
            node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                logger.warning("SuperNode %s did not say which client it is: %s", node, reply.error.reason)
                continue
            self._asked.add(node)
            pid = int(reply.content[protocol.NODE]["partition-id"])
            if pid >= self.args.num_clients:
                logger.warning(
                    "SuperNode %s has partition-id %d, outside the run's num-clients=%d: not used",
                    node,
                    pid,
                    self.args.num_clients,
                )
                continue
            if self.nodes.get(pid, node) != node:
                logger.warning("partition-id %d is now served by SuperNode %s (was %s)", pid, node, self.nodes[pid])
            self.nodes[pid] = node

    # ----- training rounds -------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Messages to the round's clients of the public schedule (`server_round` counts from 1, `round` from 0)."""
        args, round_idx = self.args, server_round - 1
        selected = self.policy.select(round_idx)
        online = set(grid.get_node_ids())
        if any(self.nodes.get(pid) not in online for pid in selected) or online - self._asked:
            self.discover(grid)  # a node (re)joined, or a selected client has none
        self._round = {"round": round_idx, "selected": selected, "failed": {}, "messages": [], "start": time.time()}
        self._uncharged = set()  # clients whose error reply says nothing was charged
        lr = float(self.learning_rates[round_idx])
        settings = {"round": round_idx, "learning-rate": lr, "local-steps": args.local_steps, "seed": args.seed}
        content = RecordDict({protocol.GLOBAL: self.arrays(), protocol.CONFIG: ConfigRecord(settings)})
        for pid in selected:
            node = self.nodes.get(pid)
            if node is None or node not in online:
                self._round["failed"][pid] = "no SuperNode online with this partition-id"
                continue
            message = Message(
                content,
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
                ttl=self.round_timeout,
            )
            self._round["messages"].append((message, pid))
        too_few = len(self._round["messages"]) < args.min_clients_per_round
        if too_few and self.policy.may_abort():  # known before anyone trains: charge nobody
            logger.warning(
                "round %d: only %d of its clients have a SuperNode online, fewer than "
                "min_clients_per_round=%d: aborted before sending",
                round_idx,
                len(self._round["messages"]),
                args.min_clients_per_round,
            )
            for _, pid in self._round["messages"]:
                self._round["failed"][pid] = "not sent: the round could not reach min_clients_per_round"
            self._round["messages"] = []
        logger.info("round %d: clients %s, sent to %d SuperNode(s)", round_idx, selected, len(self._round["messages"]))
        return [m for m, _ in self._round["messages"]]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple:
        """The new global adapter (None when the round is aborted) and the round's metrics."""
        record = self._round
        by_message = {m.metadata.message_id: pid for m, pid in record["messages"]}
        by_node = {m.metadata.dst_node_id: pid for m, pid in record["messages"]}
        answered = {}
        for reply in replies:
            pid = by_message.get(reply.metadata.reply_to_message_id, by_node.get(reply.metadata.src_node_id))
            if pid is None:
                continue
            if reply.has_error():
                self._failed(pid, reply.error.code, reply.error.reason)
            else:
                answered[pid] = reply
        aggregator = self.policy.aggregator(self.global_state, record["round"])
        clients = {}
        for pid in sorted(answered):  # client order, as the in-process trainer adds them
            try:
                clients[pid] = self._add(aggregator, pid, answered[pid])
            except Exception as exc:  # noqa: BLE001 - a malformed reply drops that client, not the run
                record["failed"][pid] = f"invalid reply: {type(exc).__name__}: {exc}"
        for pid in (pid for _, pid in record["messages"]):
            if pid not in clients and pid not in record["failed"]:
                record["failed"][pid] = NO_REPLY
            if pid not in clients and pid not in self._uncharged:
                self.unreported.setdefault(pid, []).append(record["round"])
        return self._close_round(aggregator, clients)

    def _failed(self, pid: int, code: int, reason: str) -> None:
        name = protocol.ERROR_NAMES.get(code, f"flwr error {code}")
        self._round["failed"][pid] = f"{name}: {reason}"
        if code in protocol.NOT_CHARGED:
            self._uncharged.add(pid)
        if code in (protocol.BUDGET_EXCEEDED, protocol.POLICY):
            self.refused.append({"client": pid, "round": self._round["round"], "reason": reason})
        logger.warning("round %d: client %d failed (%s): %s", self._round["round"], pid, name, reason)

    def _add(self, aggregator, pid: int, reply: Message) -> dict:
        metrics = dict(reply.content[protocol.METRICS])
        privacy = dict(reply.content[protocol.PRIVACY])
        if privacy.get("partition-id") != pid:
            raise ValueError(f"the reply says partition-id {privacy.get('partition-id')!r}, the node serves {pid}")
        aggregator.add(protocol.state_of(reply.content[protocol.DELTA]), self.policy.weight(metrics["num-examples"]))
        self.clients[pid] = {**privacy, "last_round": self._round["round"]}
        return metrics

    def _close_round(self, aggregator, clients: dict) -> tuple:
        record = self._round
        merged = self.policy.close(aggregator, record["round"], len(record["selected"]))
        aborted = merged is None
        if not aborted:
            self.global_state = merged
        entry = {
            "round": record["round"],
            "selected": record["selected"],
            "survivors": sorted(clients),
            "failed": {str(k): v for k, v in sorted(record["failed"].items())},
            "aborted": aborted,
            "started": record["start"],  # epoch seconds (the benchmark lines it up with the clients' logs)
            "seconds": time.time() - record["start"],
            "bytes_sent": {str(k): int(m["bytes-sent"]) for k, m in clients.items()},
            "client_seconds": {str(k): float(m.get("train-seconds", float("nan"))) for k, m in clients.items()},
            "loss": finite_mean(m.get("loss", math.nan) for m in clients.values()),
            "adapter_sha256": state_sha256(self.global_state),
        }
        self.history.append(entry)
        if self.on_round is not None:
            self.on_round(self.history)
        self._stop_if_unreachable()
        metrics = MetricRecord(
            {
                "clients": len(clients),
                "failed": len(record["failed"]),
                "aborted": int(aborted),
                "loss": entry["loss"],
                "epsilon": max([float(m["epsilon"]) for m in clients.values()], default=0.0),
            }
        )
        return (None if aborted else self.arrays()), metrics

    def round_lost(self) -> None:
        """The round in flight ended without replies (the SuperLink went away): its clients may have charged it."""
        record = self._round
        if record and record["round"] == len(self.history):
            for _, pid in record["messages"]:
                self.unreported.setdefault(pid, []).append(record["round"])

    def _stop_if_unreachable(self) -> None:
        aborted = len(list(itertools.takewhile(lambda entry: entry["aborted"], reversed(self.history))))
        remaining = self.args.num_rounds - 1 - self.history[-1]["round"]
        if self.max_aborted_rounds and aborted >= self.max_aborted_rounds and remaining > 0:
            raise QuorumUnreachable(
                f"{aborted} consecutive rounds (up to round {self.history[-1]['round']}) were aborted with fewer "
                f"than `min-clients-per-round` = {self.args.min_clients_per_round} surviving clients; "
                f"`max-aborted-rounds` = {self.max_aborted_rounds}, so the remaining rounds are not sent (each "
                "could charge its survivors for nothing). Restart the missing SuperNodes, lower "
                "`min-clients-per-round`, or raise `max-aborted-rounds` (0: never stop)"
            )

    # ----- no federated evaluation: the clients' data is theirs; evaluate the saved adapter -------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        args = self.args
        logger.info(
            "LALoraStrategy: %d clients, %d per round (at least %d), %d rounds x %d local steps, %s weights",
            args.num_clients,
            args.clients_per_round,
            args.min_clients_per_round,
            args.num_rounds,
            args.local_steps,
            args.aggregation_weights,
        )


def state_sha256(state: dict) -> str:
    """A fingerprint of an adapter state (names, shapes and float32 bytes), to show which rounds changed it."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode() + str(tuple(tensor.shape)).encode() + tensor.numpy().tobytes())
    return digest.hexdigest()
