"""No noise key twice (R22), Flower side: a server that sends one round twice to a client, with two global adapters
that differ a little, must not be able to subtract the replies and cancel the noise. Each release is keyed by the
node's release counter (the number of charges in its ledger), so the second reply has fresh noise and a charge.
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: `pip install '.[flower]'` (CI installs it)")

import torch  # noqa: E402
from fed_helpers import toy_dataset, toy_model  # noqa: E402
from flower_grid import InProcessGrid, train_message  # noqa: E402
from test_flower_inprocess import TASK, run_config  # noqa: E402

from peft_lalora.flower import ClientState, make_client_app, protocol  # noqa: E402
from peft_lalora.owner.state import release_seed  # noqa: E402

NODE = 101  # partition-id 1: among round 0's clients (1 and 3) in seed 0's public schedule


def replay(tmp_path, policy: dict, **overrides) -> tuple:
    """Round 0 sent twice to client 1: first with the initial adapter, then with every tensor moved by 1e-3.
    Returns (reply 1's delta minus reply 2's, as one vector; the node's state folder)."""
    data = tmp_path / "data"
    toy_dataset().select(range(40, 90)).save_to_disk(str(data))
    node = {"partition-id": 1, "data-path": str(data), "state-dir": str(tmp_path / "state"), **policy}
    grid = InProcessGrid(make_client_app(TASK), {NODE: node}, run_config(tmp_path, **overrides))
    first = {
        n: p.detach().clone() for n, p in toy_model().named_parameters() if "lora_" in n or "modules_to_save" in n
    }
    second = {n: t + 1e-3 for n, t in first.items()}
    deltas = []
    for adapter in (first, second):
        (reply,) = grid.send_and_receive([train_message(adapter, NODE)])
        assert not reply.has_error(), reply.error.reason
        delta = protocol.state_of(reply.content[protocol.DELTA])
        deltas.append(torch.cat([delta[n].flatten() for n in sorted(delta)]))
    return deltas[0] - deltas[1], ClientState(str(tmp_path / "state"))


def test_a_replayed_round_gets_fresh_noise_and_a_second_charge(tmp_path):
    # Prepare: the attack as the old key (run root, round, client) allowed it. A node whose owner fixes the noise
    # (noise-seed=0) draws the same noise and batches for both requests, so the difference of the replies is the
    # noise-free difference: what the adapters' 1e-3 gap changes in the data's clipped gradients.
    noise_free, _ = replay(tmp_path / "fixed", {"allow-fixed-noise-seed": True}, noise_seed=0)

    # Execute: the same attack on a private node (the default policy, its secret root)
    difference, state = replay(tmp_path / "private", {}, noise_seed=None)

    # Assert: with one key, the noise cancels (the difference stays small); with a key per release it does not:
    # the private difference is far from the noise-free one and far larger (two independent noise draws)
    assert noise_free.norm() < 0.01
    assert (difference - noise_free).norm() > 20 * noise_free.norm()
    assert difference.norm() > 20 * noise_free.norm()
    # Assert: both releases were charged, in order, as releases 1 and 2 of this node
    charges = state.saved()["charges"]
    assert [(c["round"], c["release"]) for c in charges] == [(0, 1), (0, 2)]
    assert charges[1]["epsilon"] > charges[0]["epsilon"] and state.epsilon() == charges[1]["epsilon"]


def test_release_seed_is_hmac_sha256_of_the_release_number():
    # Expected values from `printf 'release:1' | openssl dgst -sha256 -mac HMAC -macopt hexkey:00...00` (32 zero bytes)
    root = "00" * 32
    assert release_seed(root, 1) == "2f0e3a0afaab6dd6202928e9cd61ec638ddf431df0f5f72ee101c75362d5411a"
    assert release_seed(root, 2) == "be18afc0624b962f789863d19f15851473299aa4fcf2cf80d4c9669c68b2d84d"
