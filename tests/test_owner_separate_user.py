"""The operator guide's (docs/flower.md) two users, automated: the private trainer runs as the data owner (root here), the relay as another
user (`nobody`, in the socket folder's group), as the SuperNode's user does. The relay's process gets a released
round through the socket, and EACCES on the data folder and the state folder it never needs.

Needs root (to run the relay as another user) and an interpreter that user may execute (not one under a 0700
/root); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest
from fed_helpers import toy_dataset
from owner_task import TASK
from test_owner_trainer import FIXED, ROOT, TESTS

from peft_lalora.owner import ClientState, PrivateTrainer
from peft_lalora.owner.config import read_token
from peft_lalora.owner.permissions import check_private_paths

NOBODY = 65534  # nobody:nogroup on Debian and most Linux systems

RELAY = """
import json, os, sys
from test_owner_trainer import global_adapter, run_config
from peft_lalora.owner import TrainerRelay
data, state, sock, token = sys.argv[1:5]
out = {"uid": os.getuid()}
for name, path in (("data", data), ("state", state)):
    try:
        os.listdir(path)
        out[name] = "opened"
    except PermissionError as exc:
        out[name] = f"EACCES {exc.errno}"
reply = TrainerRelay(sock, token, timeout=600).train(
    run_id=7, round_idx=0, lr=0.5, steps=2, run_config=run_config(), global_state=global_adapter()
)
out.update(ok=reply.ok, text=reply.text, tensors=sorted(reply.delta), epsilon=reply.privacy.get("epsilon"))
print(json.dumps(out))
"""


def as_nobody(args, env, timeout=600):
    return subprocess.run(args, env=env, user=NOBODY, group=NOBODY, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def open_root():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("runs the relay as another user: needs root")
    try:
        probe = as_nobody([sys.executable, "-c", "import peft_lalora"], {"PYTHONPATH": ROOT}, timeout=300)
    except PermissionError as exc:
        pytest.skip(f"user nobody cannot execute {sys.executable} ({exc}): install Python outside /root")
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot import peft_lalora with {sys.executable}: {probe.stderr[-300:]}")
    root = tempfile.mkdtemp(prefix="lalora_users_", dir="/tmp")
    os.chmod(root, 0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root)


@pytest.mark.processes
def test_the_relay_user_gets_a_round_but_cannot_open_the_data(open_root):
    # Prepare: the owner's data and state (0700, as the README sets them), the socket folder 0750 of group nogroup
    data = os.path.join(open_root, "client_1")
    toy_dataset().select(range(40, 90)).save_to_disk(data)
    os.chmod(data, 0o700)
    state = os.path.join(open_root, "state")
    sockets = os.path.join(open_root, "run")
    os.makedirs(sockets)
    os.chown(sockets, 0, NOBODY)
    os.chmod(sockets, 0o750)
    token_path = os.path.join(sockets, "token")
    token = read_token(token_path, create=True)
    os.chown(token_path, 0, NOBODY)  # mode 0640: the relay's group reads it
    node = {"partition-id": 1, "data-path": data, "state-dir": state, **FIXED}
    ClientState(state)
    check_private_paths(node)  # the trainer's start-up check passes on the README's modes
    trainer = PrivateTrainer(TASK, node, os.path.join(sockets, "t.sock"), token)
    trainer.bind()
    os.chown(trainer.socket_path, 0, NOBODY)  # as the setgid folder of the README gives it
    thread = threading.Thread(target=trainer.serve_forever, daemon=True)
    thread.start()
    home = os.path.join(open_root, "home")  # the relay user's own (caches)
    os.makedirs(home)
    os.chown(home, NOBODY, NOBODY)
    env = {"PYTHONPATH": os.pathsep.join([ROOT, TESTS]), "HF_HUB_OFFLINE": "1", "HOME": home}
    try:
        # Execute: the relay, as user nobody
        done = as_nobody([sys.executable, "-c", RELAY, data, state, trainer.socket_path, token_path], env)
    finally:
        trainer.stop()
        thread.join(timeout=10)
    # Assert: the round was released to the relay, and its process could not open the data or the state
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["uid"] == NOBODY
    assert out["data"] == "EACCES 13" and out["state"] == "EACCES 13"
    assert out["ok"], out["text"]
    assert out["tensors"] and out["epsilon"] > 0
    assert [c["round"] for c in ClientState(state).saved()["charges"]] == [0]
