"""The operator guide's (docs/flower.md) two users, automated: the private trainer runs as the data owner (root here),
the relay as another user (`nobody`, in the socket folder's group), as the SuperNode's user does. The relay is the
torch-free one the SuperNode's ClientApp runs (`peft_lalora_relay.relay`, standard library only), so any Python that
user may execute will do (the venv's, or the system's when the venv lives under a 0700 /root). Its process gets a
released round through the socket, and EACCES on the data folder and the state folder it never needs.

Needs root (to run the relay as another user); skipped with the reason otherwise.
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
from safetensors.torch import save
from test_owner_trainer import FIXED, ROOT, global_adapter, run_config

from peft_lalora.owner import ClientState, PrivateTrainer
from peft_lalora.owner.config import read_token
from peft_lalora.owner.permissions import check_private_paths

NOBODY = 65534  # nobody:nogroup on Debian and most Linux systems
PYTHONS = (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3")  # the first that user may run

RELAY = """
import json, os, struct, sys
from peft_lalora_relay.relay import TrainerRelay
data, state, sock, token, request = sys.argv[1:6]
out = {"uid": os.getuid(), "torch": "torch" in sys.modules}
for name, path in (("data", data), ("state", state)):
    try:
        os.listdir(path)
        out[name] = "opened"
    except PermissionError as exc:
        out[name] = f"EACCES {exc.errno}"
with open(request) as handle:
    req = json.load(handle)
with open(req["adapter"], "rb") as handle:
    adapter = handle.read()
reply = TrainerRelay(sock, token, timeout=600).release(
    run_id=7, round_idx=0, lr=0.5, steps=2, run_config=req["run_config"], payload=adapter
)
(size,) = struct.unpack("<Q", reply.payload[:8]) if reply.payload else (0,)
names = sorted(k for k in json.loads(reply.payload[8 : 8 + size] or b"{}") if k != "__metadata__")
out.update(ok=reply.ok, text=reply.text, tensors=names, epsilon=reply.privacy.get("epsilon"))
print(json.dumps(out))
"""


def as_nobody(args, env, timeout=600):
    return subprocess.run(args, env=env, user=NOBODY, group=NOBODY, capture_output=True, text=True, timeout=timeout)


def relay_python() -> str:
    """An interpreter user nobody may run that imports the light relay from this checkout; skips, saying why, if none."""
    tried = []
    for python in dict.fromkeys(PYTHONS):
        try:
            probe = as_nobody([python, "-c", "import peft_lalora_relay.relay"], {"PYTHONPATH": ROOT}, timeout=120)
        except (PermissionError, FileNotFoundError) as exc:
            tried.append(f"{python}: {type(exc).__name__}")
            continue
        if probe.returncode == 0:
            return python
        tried.append(f"{python}: {probe.stderr.strip()[-200:]}")
    pytest.skip(f"user nobody can run no Python that imports peft_lalora_relay from {ROOT}: {tried}")


@pytest.fixture
def open_root():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("runs the relay as another user: needs root")
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
    request = os.path.join(home, "request.json")  # the global adapter and the run config, as the server sends them
    with open(os.path.join(home, "adapter.safetensors"), "wb") as handle:
        handle.write(save(global_adapter()))
    with open(request, "w") as handle:
        json.dump({"adapter": os.path.join(home, "adapter.safetensors"), "run_config": run_config()}, handle)
    python, env = relay_python(), {"PYTHONPATH": ROOT, "HOME": home}
    try:
        # Execute: the light relay, as user nobody
        done = as_nobody([python, "-c", RELAY, data, state, trainer.socket_path, token_path, request], env)
    finally:
        trainer.stop()
        thread.join(timeout=10)
    # Assert: the round was released to the relay, and its process could not open the data or the state
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["uid"] == NOBODY and out["torch"] is False
    assert out["data"] == "EACCES 13" and out["state"] == "EACCES 13"
    assert out["ok"], out["text"]
    assert out["tensors"] and set(out["tensors"]) <= set(global_adapter()) and out["epsilon"] > 0
    assert [c["round"] for c in ClientState(state).saved()["charges"]] == [0]
