"""The data owner sets the guarantee (R23): a SuperNode's node config is its privacy policy, and a run config that
would loosen it (no DP, a noise seed the server knows, a larger epsilon or delta, no noise) is refused: the server
gets an error reply naming the key, the value asked and the node's limit, the node logs it, nothing is charged.
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: `pip install '.[flower]'` (CI installs it)")

from fed_helpers import toy_dataset, toy_model, toy_shards  # noqa: E402
from flower_grid import InProcessGrid, train_message  # noqa: E402
from test_flower_inprocess import TASK, read_json, run_config, run_flower  # noqa: E402

from peft_lalora import ConfigError  # noqa: E402
from peft_lalora.flower import ClientState, FlowerRunError, make_client_app, protocol  # noqa: E402
from peft_lalora.owner.policy import NodePolicy  # noqa: E402

NODE = 101  # partition-id 1: among round 0's clients (1 and 3) in seed 0's public schedule
NO_CAP = {}  # a node whose owner set no policy: the defaults
CAP3 = {"max-epsilon": 3.0}
# (node policy, run-config overrides, what the refusal must say: the key and value asked, and the node's limit)
HOSTILE = {
    "no_dp": (NO_CAP, {"dp": False}, ["`dp`=False", "`allow-non-private` is false"]),
    "noise_seed": (NO_CAP, {"noise_seed": 7}, ["`noise-seed`=7", "`allow-fixed-noise-seed` is false"]),
    "large_delta": (
        NO_CAP,
        {"target_delta": 0.5, "allow_large_delta": True},
        ["`target-delta`=0.5", "`max-delta`=1e-05"],
    ),
    "sigma_0": (NO_CAP, {"noise_multiplier": 0.0}, ["`noise-multiplier`=0.0", "sigma must be > 0"]),
    "epsilon_1e6": (NO_CAP, {"target_epsilon": 1e6}, ["`target-epsilon`=1000000.0", "`max-epsilon`=8.0"]),
    "capped_no_dp": (CAP3, {"dp": False}, ["`dp`=False", "`allow-non-private` is false"]),
    "capped_noise_seed": (CAP3, {"noise_seed": 7}, ["`noise-seed`=7", "`allow-fixed-noise-seed` is false"]),
    "capped_epsilon": (CAP3, {"target_epsilon": 5.0}, ["`target-epsilon`=5.0", "`max-epsilon`=3.0"]),
    "min_sigma": (
        {"min-noise-multiplier": 2.0},
        {"noise_multiplier": 1.0},
        ["`noise-multiplier`=1.0", "sigma must be >= 2.0"],
    ),
    "min_sigma_calibrated": (  # the run's epsilon 8 calibrates a sigma below 2 on 50 examples, 4 steps, q = 0.16
        {"min-noise-multiplier": 2.0},
        {"target_epsilon": 8.0},
        ["(calibrated for `target-epsilon`=8.0)", "sigma must be >= 2.0"],
    ),
    "default_delta_above_node": (  # the run sets no delta: its default min(1e-5, 1/50) is above the node's
        {"max-delta": 1e-6},
        {},
        ["`target-delta`=1e-05", "`max-delta`=1e-06"],
    ),
}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """Client 1's 50 examples, on its node's disk."""
    path = tmp_path_factory.mktemp("policy_data") / "1"
    toy_dataset().select(range(40, 90)).save_to_disk(str(path))
    return path


def global_adapter() -> dict:
    return {n: p.detach() for n, p in toy_model().named_parameters() if "lora_" in n or "modules_to_save" in n}


def one_round(tmp_path, shard, policy: dict, **overrides):
    """Send round 0 to one node (client 1, node config `policy`) under a run config with `overrides`, noise seed
    left out; returns (the reply, the node's state folder)."""
    state = tmp_path / "state"
    node = {"partition-id": 1, "data-path": str(shard), "state-dir": str(state), **policy}
    config = run_config(tmp_path, **{"noise_seed": None, **overrides})
    grid = InProcessGrid(make_client_app(TASK), {NODE: node}, config)
    (reply,) = grid.send_and_receive([train_message(global_adapter(), NODE)])
    return reply, ClientState(str(state))


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_run_that_loosens_the_nodes_policy_is_refused_and_charges_nothing(tmp_path, shard, case, caplog):
    # Prepare
    policy, overrides, expected = HOSTILE[case]

    # Execute
    with caplog.at_level(logging.WARNING, logger="peft_lalora.owner.local_round"):
        reply, state = one_round(tmp_path, shard, policy, **overrides)

    # Assert: a policy error reply naming key, value and limit; the same text in the node's log; no charge
    assert reply.has_error() and reply.error.code == protocol.POLICY, reply.error.reason
    for text in expected:
        assert text in reply.error.reason
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(reply.error.reason in message for message in logged)
    assert state.saved() is None


@pytest.mark.parametrize(
    "policy, overrides",
    [
        (CAP3, {"target_epsilon": 2.0}),  # tighter than the node's cap
        ({"max-delta": 1e-6, "min-noise-multiplier": 0.5}, {"target_delta": 1e-7}),  # sigma 1.0, delta tighter
        ({"allow-non-private": True}, {"dp": False}),  # the owner allows a non-private trial
        ({"allow-fixed-noise-seed": True}, {"noise_seed": 7}),  # the owner allows a fixed seed (tests)
    ],
)
def test_a_run_within_the_nodes_policy_trains(tmp_path, shard, policy, overrides):
    # Execute
    reply, state = one_round(tmp_path, shard, policy, **overrides)

    # Assert: an update; a private run is charged once, under the smaller of the run's and the node's caps
    assert not reply.has_error(), reply.error.reason
    assert protocol.DELTA in reply.content
    if overrides.get("dp", True):
        saved = state.saved()
        assert len(saved["charges"]) == 1
        assert saved["target_epsilon"] == min(overrides.get("target_epsilon", 8.0), policy.get("max-epsilon", 8.0))
        assert 0 < state.epsilon() <= saved["target_epsilon"]


def test_the_server_hears_every_policy_refusal(tmp_path):
    # Prepare: four nodes whose owners set no policy; the run fixes the noise seed (noise-seed=0)
    from test_flower_inprocess import SIZES

    root = tmp_path / "data"
    toy_shards(SIZES, root)

    # Execute: nothing aggregated, so the run fails (and publishes nothing)
    with pytest.raises(FlowerRunError, match="No round of the 2 was aggregated.*refused by the node's policy"):
        run_flower(tmp_path, root, run_config(tmp_path), policy={})

    # Assert: every selected client refused each round (2 rounds x 2 clients); no ledger anywhere
    report = read_json(tmp_path / "flower" / "privacy_report.json")
    assert len(report["refused"]) == 4 and report["epsilon"] is None
    assert all("`noise-seed`=0" in r["reason"] for r in report["refused"])
    history = read_json(tmp_path / "flower" / "flower_history.json")
    assert all(reason.startswith("refused by the node's policy") for h in history for reason in h["failed"].values())
    assert not any((tmp_path / "state" / str(k) / "ledger.json").exists() for k in range(4))


def test_node_policy_defaults_and_bad_values():
    # Defaults: DP required, epsilon <= 8, delta <= 1e-5, any sigma > 0, no fixed seed
    assert NodePolicy.from_node_config({"partition-id": 0}) == NodePolicy(
        max_epsilon=8.0,
        max_delta=1e-5,
        min_noise_multiplier=0.0,
        allow_non_private=False,
        allow_fixed_noise_seed=False,
    )
    assert NodePolicy.from_node_config({"max-epsilon": 3, "allow-non-private": True}).max_epsilon == 3.0
    with pytest.raises(ConfigError, match="write `max-epsilon`"):
        NodePolicy.from_node_config({"max_epsilon": 3.0})
    with pytest.raises(ConfigError, match=r"`max-epsilon` \(node config\) must be a finite number > 0, got -1"):
        NodePolicy.from_node_config({"max-epsilon": -1})
    with pytest.raises(ConfigError, match=r"`max-delta` \(node config\) must be a finite number in \(0, 1\)"):
        NodePolicy.from_node_config({"max-delta": 1.0})
    with pytest.raises(ConfigError, match="`allow-non-private` \\(node config\\) must be true or false, got 'yes'"):
        NodePolicy.from_node_config({"allow-non-private": "yes"})
