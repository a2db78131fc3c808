"""User-level DP through Flower (issue 23): the run-config keys `privacy-unit` / `user-column`, a node's policy
`min-privacy-unit="user"` with the owner's `user-column` (a server can neither downgrade the unit nor pick the
column), the client's own plan at q = B / its users, and a node ledger that never mixes the two units."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: `pip install '.[flower]'` (CI installs it)")

from fed_helpers import toy_dataset  # noqa: E402
from flower_grid import InProcessGrid, train_message  # noqa: E402
from test_flower_inprocess import TASK, run_config  # noqa: E402
from test_flower_policy import NODE, global_adapter  # noqa: E402

from peft_lalora import ConfigError  # noqa: E402
from peft_lalora.flower import ClientState, make_client_app, protocol  # noqa: E402
from peft_lalora.owner.policy import NodePolicy  # noqa: E402

USERS = 10  # client 1's users: its 50 examples dealt round-robin
REQUIRE_USERS = {"min-privacy-unit": "user", "user-column": "user"}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """Client 1's 50 examples with a `user` column, on its node's disk."""
    path = tmp_path_factory.mktemp("user_data") / "1"
    data = toy_dataset().select(range(40, 90))
    data.add_column("user", [f"u{i % USERS}" for i in range(50)]).save_to_disk(str(path))
    return path


def one_round(tmp_path, shard, policy: dict, state_name="state", **overrides):
    """Round 0 to client 1 (node config `policy`; the owner allows the tests' fixed noise seed)."""
    state = tmp_path / state_name
    node = {"partition-id": 1, "data-path": str(shard), "state-dir": str(state), "allow-fixed-noise-seed": True}
    grid = InProcessGrid(make_client_app(TASK), {NODE: {**node, **policy}}, run_config(tmp_path, **overrides))
    (reply,) = grid.send_and_receive([train_message(global_adapter(), NODE)])
    return reply, ClientState(str(state))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, ["`privacy-unit`='example'", "`min-privacy-unit` is 'user'"]),
        ({"privacy_unit": "user", "user_column": "movie"}, ["`user-column`='movie'", "`user-column`='user'"]),
    ],
)
def test_a_node_that_requires_users_refuses_a_downgrade(tmp_path, shard, overrides, expected):
    reply, state = one_round(tmp_path, shard, REQUIRE_USERS, **overrides)
    assert reply.has_error() and reply.error.code == protocol.POLICY, reply.error.reason
    assert all(text in reply.error.reason for text in expected), reply.error.reason
    assert state.saved() is None  # nothing charged


def test_a_user_level_run_trains_and_accounts_per_user(tmp_path, shard):
    # Execute
    reply, state = one_round(tmp_path, shard, REQUIRE_USERS, privacy_unit="user", user_column="user")
    # Assert: the client's plan samples users at q = B / users; its ledger counts users
    assert not reply.has_error(), reply.error.reason
    record = reply.content.config_records[protocol.PRIVACY]
    assert record["privacy-unit"] == "user" and record["users"] == USERS
    assert record["sample-rate"] == 8 / USERS
    assert state.saved()["privacy-unit"] == "user"
    # a later example-level run on the same ledger is refused: epsilons of two units do not compose
    again, _ = one_round(tmp_path, shard, {})
    assert again.has_error() and "epsilons of different units do not compose" in again.error.reason


def test_min_privacy_unit_needs_the_owners_column():
    with pytest.raises(ConfigError, match="`user-column` is not set"):
        NodePolicy.from_node_config({"min-privacy-unit": "user"})
    with pytest.raises(ConfigError, match="`min-privacy-unit` \\(node config\\) must be one of"):
        NodePolicy.from_node_config({"min-privacy-unit": "person"})
