"""`PromptGrid`: the round's replies as soon as they are in, and Flower's timeout kept."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: `pip install '.[flower]'` (CI installs it)")

from flwr.app import Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from peft_lalora.flower.prompt_grid import PromptGrid  # noqa: E402


class LateGrid(Grid):
    """Each pushed message gets its reply after `delay` seconds (None: never); counts the pulls."""

    def __init__(self, delay):
        self.delay, self.pulls, self.pushed = delay, 0, {}

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return [1]

    def push_messages(self, messages):
        ids = []
        for k, message in enumerate(messages):
            self.pushed[f"m{k}"] = (time.time(), message)
            ids.append(f"m{k}")
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for i in message_ids:
            sent, _ = self.pushed[i]
            if self.delay is not None and time.time() >= sent + self.delay:
                reply = Message(RecordDict(), dst_node_id=0, message_type="train")
                reply.metadata.__dict__["_reply_to_message_id"] = i
                out.append(reply)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("PromptGrid must not fall back to the wrapped grid's 3 s loop")


def messages(n):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # as flower_grid.py does
    return [Message(RecordDict(), dst_node_id=1, message_type="train") for _ in range(n)]


def test_the_replies_are_collected_as_they_arrive():
    grid = LateGrid(delay=0.5)
    start = time.perf_counter()
    replies = list(PromptGrid(grid).send_and_receive(messages(2), timeout=30))
    elapsed = time.perf_counter() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert 0.5 <= elapsed < 1.5  # Flower's own loop would have waited 3 s for its second pull
    assert grid.pulls >= 2


def test_a_silent_node_is_given_up_after_the_timeout():
    start = time.perf_counter()
    replies = list(PromptGrid(LateGrid(delay=None)).send_and_receive(messages(1), timeout=0.6))
    assert replies == [] and 0.6 <= time.perf_counter() - start < 2.0


def test_only_flowers_deployment_grid_is_wrapped():
    # Prepare: Flower's deployment grid (not connected: only its type matters) and a test double
    from flwr.superlink.grid.http_grid import HttpGrid

    from peft_lalora.flower.prompt_grid import prompt_grid

    deployment, double = HttpGrid.__new__(HttpGrid), LateGrid(delay=None)
    # Execute / Assert: the deployment grid gets the prompt loop; a grid with its own loop keeps it
    assert isinstance(prompt_grid(deployment), PromptGrid) and prompt_grid(deployment).grid is deployment
    assert prompt_grid(double) is double
