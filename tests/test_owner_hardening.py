"""The private trainer against its own machine and a hostile or stalled relay: it will not start on data or state
that other users may read or write, holds at most `max-models` models, refuses a run config that changes mid-run,
and drops a caller that does not send its request within `request-timeout-s`.

The permission tests build their folders under a folder of mode 0711 in /tmp (every parent lets others pass), since
pytest's own tmp_path sits in a 0700 folder that already locks other users out.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time

import pytest
from owner_task import TASK
from test_owner_trainer import FIXED, charges, data, node_config, socket_folder, train  # noqa: F401 - fixture

from peft_lalora import ConfigError
from peft_lalora.owner import OwnerConfig, PrivateTrainer, TrainerRelay
from peft_lalora.owner.cli import main as trainer_main
from peft_lalora.owner.config import read_token
from peft_lalora.owner.local_round import _JOBS
from peft_lalora.owner.permissions import check_private_paths
from peft_lalora_relay import codes


@pytest.fixture
def open_root():
    """A folder in /tmp that every user may pass through (mode 0711): what is inside is as open as its own mode."""
    root = tempfile.mkdtemp(prefix="lalora_perm_", dir="/tmp")
    os.chmod(root, 0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root)


def folder(root, name, mode):
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)
    return path


# ----- the owner's files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, expected",
    [
        (0o755, "mode 0755: other users may read it"),
        (0o777, "mode 0777: its group or others may write it"),
        (0o750, "mode 0750: its group may read it"),
    ],
)
def test_a_data_folder_others_may_read_or_write_is_refused(open_root, mode, expected):
    path = folder(open_root, "client_0", mode)
    with pytest.raises(ConfigError, match=rf"`data-path` '{path}' has {expected}.*run `chmod -R go-rwx {path}`"):
        check_private_paths({"data-path": path})


def test_a_closed_data_folder_or_one_inside_a_closed_folder_passes(open_root):
    # Prepare: three data folders others cannot reach (closed; open inside a closed parent; group-readable, allowed)
    private = folder(open_root, "private", 0o700)
    cases = [
        ({"data-path": folder(open_root, "closed", 0o700)}, False),
        ({"data-path": folder(private, "client_0", 0o755)}, False),  # others cannot reach it
        ({"data-path": folder(open_root, "group", 0o750)}, True),
    ]
    # Execute: the start-up check on each (a refusal raises ConfigError, failing the test)
    passed = [check_private_paths(config, allow_group_read=group) is None for config, group in cases]
    # Assert: all pass, and the group-readable one is refused once group read is not allowed (the check did run)
    assert passed == [True, True, True]
    with pytest.raises(ConfigError, match="its group may read it"):
        check_private_paths(cases[2][0])


def test_a_state_folder_or_secret_others_may_use_is_refused(open_root):
    state = folder(open_root, "state", 0o755)
    with pytest.raises(ConfigError, match=rf"`state-dir` '{state}' has mode 0755.*`chmod 0700 {state}`"):
        check_private_paths({"state-dir": state})
    os.chmod(state, 0o700)
    secret = os.path.join(state, "secret.json")
    with open(secret, "w") as handle:
        handle.write("{}")
    os.chmod(secret, 0o644)  # inside a 0700 folder, but a secret is never shared
    with pytest.raises(ConfigError, match=rf"'{secret}' has mode 0644.*`chmod 0600 {secret}`"):
        check_private_paths({"state-dir": state})
    os.chmod(secret, 0o600)
    ledger = os.path.join(state, "ledger.json")
    with open(ledger, "w") as handle:
        handle.write("{}")
    os.chmod(ledger, 0o664)
    with pytest.raises(ConfigError, match=rf"'{ledger}' has mode 0664: its group or others may write it"):
        check_private_paths({"state-dir": state})
    os.chmod(ledger, 0o600)
    check_private_paths({"state-dir": state})


def test_the_trainer_refuses_to_start_on_an_open_data_folder(open_root, capsys):
    data_path = folder(open_root, "client_0", 0o755)
    sockets = folder(open_root, "run", 0o700)
    config = os.path.join(sockets, "owner.toml")
    with open(config, "w") as handle:
        handle.write(
            f'task = "owner_task:TASK"\nsocket = "{sockets}/t.sock"\ntoken-file = "{sockets}/token"\n'
            f'[node-config]\npartition-id = 1\ndata-path = "{data_path}"\n'
        )
    with pytest.raises(SystemExit) as exit_info:
        trainer_main(["--config", config])
    assert exit_info.value.code == 2
    assert f"`data-path` '{data_path}' has mode 0755" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(sockets, "t.sock"))  # it never listened


@pytest.mark.parametrize(
    "key, value",
    [("max-models", 0), ("max-models", 1.5), ("request-timeout-s", 0), ("request-timeout-s", float("inf"))],
)
def test_the_new_config_keys_are_checked(key, value):
    base = {"task": "m:T", "socket": "/run/x/s", "token-file": "/run/x/t"}
    with pytest.raises(ConfigError, match=rf"`{key}` \(private trainer config\) must be"):
        OwnerConfig.from_dict({**base, key: value})
    config = OwnerConfig.from_dict(base)
    assert config.max_models == 2 and config.request_timeout_s == 10.0 and config.allow_group_read is False


# ----- a hostile or stalled relay ---------------------------------------------------------------------------------
def start(tmp_path, data, **options):  # noqa: F811 - `data` is the fixture's value
    sockets = socket_folder(tmp_path)
    token = read_token(str(sockets / "token"), create=True)
    server = PrivateTrainer(TASK, node_config(tmp_path, data, FIXED), str(sockets / "t.sock"), token, **options)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, TrainerRelay(server.socket_path, str(sockets / "token"), timeout=120)


def test_a_run_config_changed_mid_run_is_refused_and_models_stay_bounded(tmp_path, data):  # noqa: F811
    server, thread, relay = start(tmp_path, data, max_models=1)
    try:
        assert train(relay).ok
        # Execute: the same run with another config (a relay cycling configs to make the trainer build models)
        changed = train(relay, round_idx=1, **{"batch-size": 4})
        other_run = train(relay, run_id=8)
    finally:
        server.stop()
        thread.join(timeout=10)
    assert changed.code == codes.RUN_CONFIG_CHANGED and "['batch-size']" in changed.text, changed.text
    assert other_run.ok, other_run.text
    assert [r for r, _ in charges(tmp_path)] == [0, 0]  # run 7 round 0, run 8 round 0: the change charged nothing
    assert len(_JOBS) <= 1  # run 7's model went when run 8's came


def test_a_caller_that_sends_nothing_holds_others_back_only_until_its_timeout(tmp_path, data):  # noqa: F811
    server, thread, relay = start(tmp_path, data, request_timeout_s=0.5)
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stalled.connect(server.socket_path)  # connects, sends nothing, never closes
        time.sleep(0.1)  # the trainer is now reading from it
        start_s = time.perf_counter()
        assert relay.describe() == 1
        waited = time.perf_counter() - start_s
        stalled.settimeout(5)
        assert stalled.recv(1) == b""  # the trainer dropped it
    finally:
        stalled.close()
        server.stop()
        thread.join(timeout=10)
    assert waited < 5, f"the next caller waited {waited:.1f} s"


def test_a_trainer_that_stops_after_its_successor_bound_leaves_the_successors_socket(tmp_path, data):  # noqa: F811
    old, old_thread, _ = start(tmp_path, data)
    new = PrivateTrainer(TASK, node_config(tmp_path, data, FIXED), old.socket_path, "ab" * 32)
    new.bind()  # a restart while the old process is still shutting down
    old.stop()
    old_thread.join(timeout=10)
    try:
        assert os.path.exists(new.socket_path)
    finally:
        new._listener.close()
