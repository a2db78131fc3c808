"""A `Grid` that collects the replies of a round as soon as they arrive.

Flower 1.42's deployment grid (`HttpGrid.send_and_receive`) waits a fixed 3 s between its pulls of the SuperLink,
so a round ends up to 3 s after its last reply (1.5 s on average), whatever the clients' compute: the grid has no
setting for it. This wrapper keeps every call of the grid it wraps and replaces only `send_and_receive` by the same
loop over the grid's own `push_messages` / `pull_messages` with a shorter wait (a pull is one small request to the
SuperLink). Measured in `benchmarks/flower_round_overhead.py`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid

PULL_INTERVAL_S = 0.2


def prompt_grid(grid: Grid) -> Grid:
    """`PromptGrid(grid)` for Flower's deployment grid (the one with the fixed 3 s wait); any other grid (the
    simulation's, a test double) keeps its own `send_and_receive`."""
    return PromptGrid(grid) if isinstance(grid, HttpGrid) else grid


class PromptGrid:
    """`grid` with `send_and_receive` pulling every `interval` seconds (until every reply or `timeout`). Every other
    attribute is the wrapped grid's (Flower's strategies only call a grid's methods; none checks its class)."""

    def __init__(self, grid: Grid, interval: float = PULL_INTERVAL_S):
        self.grid = grid
        self.interval = interval

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's `send_and_receive` (push, then pull until every reply is in or `timeout` has passed)."""
        pending = set(self.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            pulled = list(self.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not pending:
                break
            time.sleep(self.interval)
        return replies
