"""The ClientApp in relay mode: a Flower run whose nodes only relay to their owners' private trainers (in threads
here, on Unix sockets in tmp_path) equals the run whose ClientApps train themselves, and the relaying ClientApp
never builds the model or opens the data: its task refuses to.
"""

from __future__ import annotations

import os
import threading

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: `pip install '.[flower]'` (CI installs it)")

import torch  # noqa: E402
from flower_grid import InProcessGrid, train_message  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_flower_inprocess import SIZES, TASK, TEST_POLICY, run_config, run_flower, shards  # noqa: E402, F401

from peft_lalora.flower import FlowerTask, make_client_app, make_server_app, protocol  # noqa: E402
from peft_lalora.owner import ClientState, PrivateTrainer  # noqa: E402
from peft_lalora.owner.config import read_token  # noqa: E402


def refuse(*args):
    raise AssertionError("the relaying ClientApp built the model or opened the data")


BLIND = FlowerTask(build_model=refuse, load_client_data=refuse, config_keys=("method",))


def start_trainers(tmp_path, shard_root, policy):
    """One private trainer per client, each with its own data, state folder and policy; (trainers, node configs)."""
    folder = tmp_path / "s"
    folder.mkdir(mode=0o700)
    token_path = str(folder / "token")
    token = read_token(token_path, create=True)
    trainers, nodes = [], {}
    for k in range(len(SIZES)):
        config = {
            "partition-id": k,
            "data-path": str(shard_root / str(k)),
            "state-dir": str(tmp_path / "owner" / str(k)),
        }
        trainer = PrivateTrainer(TASK, {**config, **policy}, str(folder / f"{k}.sock"), token)
        trainer.bind()
        threading.Thread(target=trainer.serve_forever, daemon=True).start()
        trainers.append(trainer)
        nodes[100 + k] = {"private-trainer": trainer.socket_path, "private-trainer-token": token_path}
    return trainers, nodes


def test_a_relayed_flower_run_equals_the_in_clientapp_run(tmp_path, shards):  # noqa: F811 (the fixture)
    # Prepare: the same run (fixed noise seed, allowed by every owner) in both modes
    root, _ = shards
    run_flower(tmp_path / "trial", root, run_config(tmp_path / "trial"))
    trainers, nodes = start_trainers(tmp_path, root, TEST_POLICY)
    config = run_config(tmp_path / "relay")
    try:
        # Execute
        grid = InProcessGrid(make_client_app(BLIND), nodes, config)
        make_server_app(TASK)(grid, grid.server_context())
    finally:
        for trainer in trainers:
            trainer.stop()
    # Assert: the same adapter to 0.0, the same epsilons; the charges are on the owners' ledgers only
    ours = load_file(str(tmp_path / "relay" / "flower" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "trial" / "flower" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=0, rtol=0)
    for k in range(len(SIZES)):
        owner = ClientState(str(tmp_path / "owner" / str(k))).epsilon()
        assert owner == ClientState(str(tmp_path / "trial" / "state" / str(k))).epsilon()
    assert not os.path.exists(tmp_path / "relay" / "state")


def test_a_relaying_clientapp_gets_the_owners_refusal(tmp_path, shards):  # noqa: F811 (the fixture)
    # Prepare: owners with the default policy; a run that fixes the noise seed
    root, _ = shards
    trainers, nodes = start_trainers(tmp_path, root, {})
    grid = InProcessGrid(make_client_app(BLIND), {101: nodes[101]}, run_config(tmp_path))
    adapter = {n: p for n, p in TASK.model(run_config(tmp_path), {}).named_parameters() if p.requires_grad}
    try:
        # Execute
        (reply,) = grid.send_and_receive([train_message(adapter, 101)])
    finally:
        for trainer in trainers:
            trainer.stop()
    # Assert: the owner's policy error, nothing charged
    assert reply.has_error() and reply.error.code == protocol.POLICY
    assert "`allow-fixed-noise-seed` is false" in reply.error.reason
    assert ClientState(str(tmp_path / "owner" / "1")).saved() is None


def test_a_relaying_clientapp_without_its_trainer_says_so(tmp_path):
    nodes = {100: {"private-trainer": str(tmp_path / "none.sock"), "private-trainer-token": str(tmp_path / "t")}}
    (tmp_path / "t").write_text("ab" * 32)
    os.chmod(tmp_path / "t", 0o600)
    grid = InProcessGrid(make_client_app(BLIND), nodes, run_config(tmp_path))
    (reply,) = grid.send_and_receive([train_message({}, 100)])
    assert reply.has_error() and reply.error.code == protocol.TRAINER_UNAVAILABLE
    assert "lalora-private-trainer" in reply.error.reason
