"""The data owner's private trainer (`peft_lalora.owner`): a relay gets only what the trainer's own policy releases.

In-process tests run the trainer in a thread on a Unix socket in tmp_path; the `processes` tests start
`python -m peft_lalora.owner.cli` and kill it. Client 1 of seed 0's public schedule is in round 0 (clients 1, 3).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from fed_helpers import flower_run_config, toy_dataset, toy_model
from owner_task import TASK

from peft_lalora import ConfigError
from peft_lalora.owner import ClientState, OwnerConfig, PrivateTrainer, TrainerRelay
from peft_lalora.owner.config import read_token
from peft_lalora.owner.local_round import local_round
from peft_lalora.owner.wire import recv_frame, send_frame
from peft_lalora_relay import codes
from peft_lalora_relay.wire import MAGIC, PROTOCOL

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
FIXED = {"allow-fixed-noise-seed": True}  # an owner who allows the tests' fixed noise seed


def run_config(**overrides) -> dict:
    """The run config a server sends (as in test_flower_inprocess): 4 clients, 2 per round, sigma 1, noise seed 0."""
    config = {**flower_run_config(), **overrides}
    return {k: v for k, v in config.items() if v is not None}


def train_header(relay, **changes) -> dict:
    """The header of a well-formed train request of run 7, round 0, with the relay's token."""
    header = {
        "protocol": PROTOCOL,
        "token": read_token(relay.token_path),
        "type": "train",
        "run-id": 7,
        "round": 0,
        "local-steps": 2,
        "learning-rate": 0.5,
        "run-config": run_config(),
    }
    return {**header, **changes}


def global_adapter() -> dict:
    return {n: p.detach().clone() for n, p in toy_model().named_parameters() if "lora_" in n or "modules_to_save" in n}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("owner_data") / "client_1"
    toy_dataset().select(range(40, 90)).save_to_disk(str(path))
    return str(path)


def node_config(tmp_path, data, policy=None) -> dict:
    return {"partition-id": 1, "data-path": data, "state-dir": str(tmp_path / "state"), **(policy or {})}


def socket_folder(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


@pytest.fixture
def trainer(tmp_path, data, request):
    """A private trainer in a thread; its owner's policy is the test's `policy` parameter (default: none set)."""
    policy = getattr(request, "param", None)
    folder = socket_folder(tmp_path)
    token = read_token(str(folder / "token"), create=True)
    config = node_config(tmp_path, data, policy)
    server = PrivateTrainer(TASK, config, str(folder / "t.sock"), token, max_payload_bytes=1 << 20)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, TrainerRelay(server.socket_path, str(folder / "token"), timeout=120)
    finally:
        server.stop()
        thread.join(timeout=10)


def train(relay, round_idx=0, run_id=7, state=None, **overrides):
    return relay.train(
        run_id=run_id,
        round_idx=round_idx,
        lr=0.5,
        steps=2,
        run_config=run_config(**overrides),
        global_state=state or global_adapter(),
    )


def raw(server, data: bytes, *, close_after_send=False) -> dict | None:
    """Send raw bytes to the trainer; its reply header (None if closed before it answered)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(60)
        conn.connect(server.socket_path)
        conn.sendall(data)
        if close_after_send:
            return None
        conn.shutdown(socket.SHUT_WR)
        header, _ = recv_frame(conn)
        return header


def frame(header: dict) -> bytes:
    body = json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(body)) + body


def charges(tmp_path) -> list:
    saved = ClientState(str(tmp_path / "state")).saved()
    return [(c["round"], c["release"]) for c in saved["charges"]] if saved else []


# ----- a relay round ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer", [FIXED], indirect=True)
def test_a_relay_round_equals_the_in_process_round(tmp_path, data, trainer):
    # Prepare: the same round computed by the trial mode's code in this process, on another state folder
    _, relay = trainer
    local = local_round(
        TASK,
        run_id=7,
        node_id=0,
        run_config=run_config(),
        node_config=node_config(tmp_path / "local", data, FIXED),
        round_idx=0,
        lr=0.5,
        steps=2,
        global_state=global_adapter(),
    )
    # Execute
    reply = train(relay)
    # Assert: the same delta to 0.0 (fixed noise seed), the same accounting, one charge on the trainer's ledger
    assert reply.ok, reply.text
    assert sorted(reply.delta) == sorted(local.delta)
    for name, tensor in local.delta.items():
        torch.testing.assert_close(reply.delta[name], tensor, rtol=0, atol=0)
    assert reply.privacy == local.privacy and reply.privacy["epsilon"] > 0
    assert charges(tmp_path) == [(0, 1)]


def test_the_relay_gets_the_trainers_client_id(trainer):
    _, relay = trainer
    assert relay.describe() == 1


# ----- a hostile relay gets nothing private --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"dp": False, "noise-multiplier": None, "noise-seed": None}, "`allow-non-private` is false"),
        ({}, "`allow-fixed-noise-seed` is false"),  # the run config's noise-seed 0
        ({"noise-seed": None, "noise-multiplier": None, "target-epsilon": 100.0}, "above this node's `max-epsilon`"),
    ],
)
def test_a_run_config_that_loosens_the_owners_policy_is_refused(tmp_path, trainer, overrides, expected):
    _, relay = trainer
    reply = train(relay, **overrides)
    assert reply.code == codes.POLICY and expected in reply.text, reply.text
    assert reply.delta == {} and charges(tmp_path) == []


def test_a_wrong_token_is_refused_before_anything_is_loaded(tmp_path, trainer):
    server, _ = trainer
    wrong = tmp_path / "wrong"
    wrong.write_text("ab" * 32)
    os.chmod(wrong, 0o600)
    reply = train(TrainerRelay(server.socket_path, str(wrong)))
    assert reply.code == codes.UNAUTHORIZED and charges(tmp_path) == []


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"GET / HTTP/1.1\r\n\r\n", "does not start with"),
        (MAGIC + struct.pack(">I", 10 << 20), "above the cap"),  # a 10 MiB header
        (MAGIC + struct.pack(">I", 5) + b"[1,2]", "must be a JSON object"),
        (frame({"payload-bytes": 1 << 30}), "`payload-bytes` must be an integer in [0, 1048576]"),
        (frame({"protocol": PROTOCOL, "payload-bytes": 4}) + b"\x00" * 4, "not safetensors"),
        (MAGIC + struct.pack(">I", 13) + b'{"a": NaN}   ', "NaN"),
    ],
)
def test_a_bad_frame_gets_an_error_reply_and_changes_nothing(tmp_path, trainer, data, expected):
    server, relay = trainer
    header = raw(server, data)
    assert header["ok"] is False and header["code"] == codes.BAD_REQUEST and expected in header["error"], header
    assert charges(tmp_path) == [] and relay.describe() == 1  # and the trainer still serves


def test_a_request_with_bad_fields_is_refused(tmp_path, trainer):
    server, relay = trainer
    base = train_header(relay, **{"run-config": run_config(**{"noise-seed": None})})
    for change, expected in (
        ({"type": "shell"}, "`type` must be"),
        ({"round": -1}, "`round` must be >= 0"),
        ({"learning-rate": "0.5"}, "`learning-rate` must be a number"),
        ({"run-config": {"dp": [1]}}, "`run-config` must be"),
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(server.socket_path)
            send_frame(conn, {**base, **change}, global_adapter())
            header, tensors = recv_frame(conn)
        assert header["code"] == codes.BAD_REQUEST and expected in header["error"] and tensors == {}, header
    assert charges(tmp_path) == []


def test_a_second_answer_to_a_round_is_charged_again_with_fresh_noise(tmp_path, trainer):
    # Prepare: the replay attack (test_flower_replay) through the relay, on the owner's default (private) policy
    _, relay = trainer
    first = global_adapter()
    second = {n: t + 1e-3 for n, t in first.items()}
    # Execute
    replies = [train(relay, state=s, **{"noise-seed": None}) for s in (first, second)]
    # Assert: both released and charged as releases 1 and 2; the noise does not cancel in their difference
    assert all(r.ok for r in replies), [r.text for r in replies]
    assert charges(tmp_path) == [(0, 1), (0, 2)]
    difference = torch.cat([(replies[0].delta[n] - replies[1].delta[n]).flatten() for n in sorted(first)])
    assert difference.norm() > 0.1
    assert replies[1].privacy["epsilon"] > replies[0].privacy["epsilon"]


@pytest.mark.parametrize("trainer", [FIXED], indirect=True)
def test_a_round_before_one_already_trained_is_out_of_order(tmp_path, trainer):
    server, relay = trainer
    assert train(relay, round_idx=1, **{"clients-per-round": 4}).ok
    reply = train(relay, round_idx=0, **{"clients-per-round": 4})
    assert reply.code == codes.OUT_OF_ORDER and "rounds only advance" in reply.text
    assert charges(tmp_path) == [(1, 1)]
    assert train(relay, round_idx=0, run_id=8, **{"clients-per-round": 4}).ok  # another run starts at round 0
    server.last_round.clear()  # a restarted trainer: the ledger on disk still orders the rounds
    assert train(relay, round_idx=0, **{"clients-per-round": 4}).code == codes.OUT_OF_ORDER


@pytest.mark.parametrize("trainer", [FIXED], indirect=True)
def test_the_trainer_survives_a_caller_that_dies_mid_request(tmp_path, trainer):
    server, relay = trainer
    header = {
        **train_header(relay),
        "payload-bytes": 5000,
    }
    # Execute: a caller that dies half-way through its payload, then one that dies while the trainer trains
    raw(server, frame(header) + b"\x00" * 100, close_after_send=True)
    time.sleep(0.5)
    assert charges(tmp_path) == []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(server.socket_path)
        send_frame(conn, {k: v for k, v in header.items() if k != "payload-bytes"}, global_adapter())
    for _ in range(600):
        if charges(tmp_path):
            break
        time.sleep(0.1)
    # Assert: nothing charged for the cut request, the second one's charge kept; the trainer serves the next caller
    reply = train(relay)
    assert reply.ok, reply.text
    assert charges(tmp_path) == [(0, 1), (0, 2)]


def test_a_socket_folder_others_may_enter_is_refused(tmp_path, data):
    folder = tmp_path / "open"
    folder.mkdir()
    os.chmod(folder, 0o755)
    server = PrivateTrainer(TASK, node_config(tmp_path, data), str(folder / "t.sock"), "ab" * 32)
    with pytest.raises(ConfigError, match=r"has mode 0755: others may enter it"):
        server.bind()


def test_a_token_file_others_may_read_is_refused(tmp_path):
    path = tmp_path / "token"
    path.write_text("ab" * 32)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match=r"`token-file` .* has mode 0644: others may read it"):
        read_token(str(path))


# ----- the trainer as the owner starts it ---------------------------------------------------------------------------
def start_trainer(tmp_path, data, *, hang=False, policy=None):
    folder = socket_folder(tmp_path)
    config = {
        "task": "owner_task:TASK",
        "python-path": [TESTS],
        "socket": str(folder / "t.sock"),
        "token-file": str(folder / "token"),
        "node-config": node_config(tmp_path, data, policy),
    }
    (tmp_path / "owner.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])}
    if hang:
        env["OWNER_TASK_HANG"] = "1"
    log = open(tmp_path / "trainer.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "peft_lalora.owner.cli", "--config", str(tmp_path / "owner.json")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    for _ in range(600):
        if os.path.exists(folder / "t.sock") or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert proc.poll() is None, (tmp_path / "trainer.log").read_text()
    return proc, TrainerRelay(str(folder / "t.sock"), str(folder / "token"), timeout=300)


def stop(proc):
    """Stop the trainer's process group (it starts no children; the group catches any)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.processes
def test_the_owners_trainer_process_trains_and_charges_once(tmp_path, data):
    proc, relay = start_trainer(tmp_path, data, policy=FIXED)
    try:
        reply = train(relay)
        assert reply.ok, reply.text
        assert charges(tmp_path) == [(0, 1)] and reply.metrics["epsilon"] == reply.privacy["epsilon"]
        assert "loss" not in reply.metrics  # not shared by the owner
        hostile = {"noise-seed": None, "dp": False, "noise-multiplier": None}
        assert train(relay, run_id=8, **hostile).code == codes.POLICY  # a new run asking for no DP
        assert train(relay, **hostile).code == codes.RUN_CONFIG_CHANGED  # the same run switching DP off
        assert charges(tmp_path) == [(0, 1)]
    finally:
        stop(proc)
    assert "listening on" in (tmp_path / "trainer.log").read_text()  # the owner sees its trainer's INFO lines


@pytest.mark.processes
def test_a_trainer_killed_after_its_charge_loses_no_ledger_entry(tmp_path, data):
    # Prepare: a trainer whose batches hang once its ledger holds a charge
    proc, relay = start_trainer(tmp_path, data, hang=True)
    try:
        result = {}
        caller = threading.Thread(target=lambda: result.update(reply=train(relay, **{"noise-seed": None})))
        caller.start()
        for _ in range(1200):
            if charges(tmp_path):
                break
            time.sleep(0.1)
        # Execute
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        caller.join(timeout=60)
    finally:
        stop(proc)
    # Assert: the charge is on disk, and the caller learns only that the trainer went away
    assert charges(tmp_path) == [(0, 1)]
    assert ClientState(str(tmp_path / "state")).epsilon() > 0
    assert result["reply"].code == codes.TRAINER_UNAVAILABLE and result["reply"].delta == {}


def test_the_operator_guides_owner_config_reads():
    # The owner's config as the operator guide writes it (between `tee /etc/lalora-owner/owner.toml` and EOT)
    import tomllib

    with open(os.path.join(ROOT, "docs", "flower.md")) as handle:
        text = handle.read()
    body = text.split("tee /etc/lalora-owner/owner.toml > /dev/null <<EOT\n", 1)[1].split("\nEOT\n", 1)[0]
    config = OwnerConfig.from_dict(tomllib.loads(body), base="/")
    assert config.task == "lalora_rt.task:TASK" and config.socket == "/run/lalora/trainer.sock"
    assert config.node_config["partition-id"] == 3 and config.node_config["max-epsilon"] == 8.0


def test_the_owner_package_imports_no_flower():
    code = "import sys, peft_lalora.owner.cli, owner_task; assert 'flwr' not in sys.modules, 'flwr imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS])}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
