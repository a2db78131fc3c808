"""The torch-free relay ClientApp (`peft_lalora_relay`): what Flower's process per message imports, and the bytes
it forwards to the private trainer and back. The trainer here is a stand-in that speaks the wire format and decodes
with `safetensors.torch` (the real trainer's decoder), so the numpy path is checked against an independent one;
tests/test_flower_relay.py runs whole Flower runs against the real `PrivateTrainer`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: `pip install '.[flower]'` (CI installs it)")

import torch  # noqa: E402
from flower_grid import InProcessGrid, train_message  # noqa: E402
from safetensors.torch import load as load_tensors  # noqa: E402
from safetensors.torch import save as save_tensors  # noqa: E402

from peft_lalora.flower import protocol  # noqa: E402
from peft_lalora_relay.client_app import make_client_app  # noqa: E402
from peft_lalora_relay.wire import PROTOCOL, recv_bytes, send_bytes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "ab" * 32
HEAVY = ("torch", "transformers", "peft", "peft_lalora", "datasets", "opacus")


def test_the_relay_clientapp_imports_neither_torch_nor_peft_lalora():
    # Execute: what `flwr-clientapp` imports for the recipe (its pyproject's `clientapp`), in a fresh interpreter
    code = (
        "import sys, tomllib\n"
        "spec = tomllib.load(open(sys.argv[1], 'rb'))['tool']['flwr']['app']['components']['clientapp']\n"
        "module, attr = spec.split(':')\n"
        "getattr(__import__(module, fromlist=[attr]), attr)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    app = os.path.join(ROOT, "recipes", "flower_app")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, app]))
    out = subprocess.run(
        [sys.executable, "-c", code, os.path.join(app, "pyproject.toml")], env=env, capture_output=True, text=True
    )
    # Assert
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class StandInTrainer:
    """Answers one request per connection with `answer(header, tensors) -> (header, payload bytes)`."""

    def __init__(self, path: str, answer):
        self.path, self.answer, self.seen = path, answer, []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                header, payload = recv_bytes(conn)
                tensors = load_tensors(payload) if payload else {}
                self.seen.append((header, tensors))
                send_bytes(conn, *self.answer(header, tensors))

    def close(self):
        self.listener.close()


@pytest.fixture
def relay_node(tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    os.chmod(token, 0o600)
    return {"private-trainer": str(tmp_path / "t.sock"), "private-trainer-token": str(token)}


def one_round(node_config, global_state, app=None):
    grid = InProcessGrid(app or make_client_app(), {7: node_config}, {"method": "lalora", "seed": 3})
    (reply,) = grid.send_and_receive([train_message(global_state, 7, round_idx=2, lr=0.25, steps=4)])
    return reply


def test_the_light_relay_forwards_the_adapter_and_returns_the_release_bit_for_bit(relay_node):
    # Prepare: a global adapter of odd values; a stand-in that releases a delta of its own
    gen = torch.Generator().manual_seed(0)
    global_state = {"a.lora_A": torch.randn(3, 5, generator=gen), "b.lora_B": torch.randn(5, 2, generator=gen) * 1e-30}
    delta = {"a.lora_A": torch.randn(3, 5, generator=gen), "head.weight": torch.randn(2, 4, generator=gen)}
    released = {"ok": True, "protocol": PROTOCOL, "metrics": {"num-examples": 9, "loss": None}, "privacy": {"e": 1.5}}
    trainer = StandInTrainer(relay_node["private-trainer"], lambda h, t: (released, save_tensors(delta)))
    try:
        # Execute
        reply = one_round(relay_node, global_state)
    finally:
        trainer.close()
    # Assert: the request (token, round, schedule, run config, adapter) as sent; the release as received
    ((header, tensors),) = trainer.seen
    assert header["token"] == TOKEN and header["protocol"] == PROTOCOL and header["type"] == "train"
    assert (header["run-id"], header["round"], header["learning-rate"], header["local-steps"]) == (1, 2, 0.25, 4)
    assert header["run-config"] == {"method": "lalora", "seed": 3}
    assert sorted(tensors) == sorted(global_state)
    for name, tensor in global_state.items():
        assert torch.equal(tensors[name], tensor)
    assert not reply.has_error()
    got = protocol.state_of(reply.content[protocol.DELTA])
    assert sorted(got) == sorted(delta) and all(torch.equal(got[n], delta[n]) for n in delta)
    metrics = reply.content[protocol.METRICS]
    assert metrics["num-examples"] == 9 and metrics["loss"] == float("inf")
    assert metrics["bytes-sent"] == reply.content[protocol.DELTA].count_bytes()
    assert dict(reply.content[protocol.PRIVACY]) == {"e": 1.5}


@pytest.mark.parametrize(
    "answer, code, says",
    [
        (lambda h, t: ({"ok": False, "code": protocol.POLICY, "error": "no"}, b""), protocol.POLICY, "no"),
        (
            lambda h, t: ({"ok": True, "metrics": {}, "privacy": {}}, b"garbage"),
            protocol.TRAINER_UNAVAILABLE,
            "not safetensors",
        ),
    ],
    ids=["refusal", "garbage"],
)
def test_the_light_relay_turns_the_trainers_refusal_or_garbage_into_an_error_reply(relay_node, answer, code, says):
    trainer = StandInTrainer(relay_node["private-trainer"], answer)
    try:
        reply = one_round(relay_node, {"x": torch.ones(2)})
    finally:
        trainer.close()
    assert reply.has_error() and reply.error.code == code and says in reply.error.reason


@pytest.mark.parametrize(
    "change, code, says",
    [
        ({"private-trainer": "/nonexistent/t.sock"}, protocol.TRAINER_UNAVAILABLE, "lalora-private-trainer"),
        ({"private-trainer-token": "/nonexistent/token"}, protocol.CLIENT_CONFIG, "`token-file`"),
        ({"private-trainer-token": None}, protocol.CLIENT_CONFIG, "Relay mode needs both"),
    ],
    ids=["no-trainer", "no-token", "half-config"],
)
def test_the_light_relay_answers_a_broken_node_config_with_an_error_reply(relay_node, change, code, says):
    node = {k: v for k, v in {**relay_node, **change}.items() if v is not None}
    reply = one_round(node, {"x": torch.ones(2)})
    assert reply.has_error() and reply.error.code == code and says in reply.error.reason


def test_a_relay_only_clientapp_refuses_a_node_without_a_trainer():
    reply = one_round({"partition-id": 0}, {"x": torch.ones(2)})
    assert reply.has_error() and reply.error.code == protocol.CLIENT_CONFIG
    assert "only relays" in reply.error.reason


def test_the_light_clientapp_needs_a_task_spec():
    with pytest.raises(ValueError, match="`trial_task`"):
        make_client_app(trial_task="lalora_rt.task.TASK")


def test_the_light_clientapp_in_trial_mode_is_the_full_clientapp_of_its_task():
    # Prepare: a node without a private trainer; the task named as the recipe names its own
    from flwr.app import Message, RecordDict

    app = make_client_app(trial_task="test_flower_inprocess:TASK")
    grid = InProcessGrid(app, {5: {"partition-id": 3}, 6: {}}, {"method": "lalora"})
    # Execute
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="query") for n in (5, 6)])
    # Assert: peft_lalora.flower's answers (its partition-id, its error for a node config without one)
    ok, bad = sorted(replies, key=lambda r: r.has_error())
    assert ok.content[protocol.NODE]["partition-id"] == 3
    assert bad.error.code == protocol.CLIENT_CONFIG and "partition-id" in bad.error.reason
