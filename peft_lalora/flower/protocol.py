"""What travels between the ServerApp and a ClientApp: record names, config keys and error codes.

Server -> client (train): `global` (every adapter tensor, float32) and `config` (ConfigRecord:
`round` (0-based, as in `FederatedDPTrainer`), `learning-rate`, `local-steps`, `seed` (the public seed)).
Client -> server: `delta` (only the tensors it trained, plus the head), `metrics` (MetricRecord:
`num-examples`, `steps`, `epsilon`, `bytes-sent`, `train-seconds`; `loss`, `sampled`, `dropped` only where the
node shares them or the run is not private) and `privacy` (ConfigRecord: the client's accounting, see
`owner.local_round.privacy_record`), or an error reply with a code of `peft_lalora_relay.codes`.
Query: the server asks a node which client it is; the reply is `node` (ConfigRecord: `partition-id`).
Tensors travel packed: an ArrayRecord of one Array of safetensors bytes (`pack_state` / `state_of`; why:
`peft_lalora_relay.packed`).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from safetensors.torch import save as save_tensors

from peft_lalora_relay.codes import (  # noqa: F401 - the protocol's names, read from here by the apps and tests
    BAD_REQUEST,
    BUDGET_EXCEEDED,
    CLIENT_CONFIG,
    ERROR_NAMES,
    NOT_CHARGED,
    OUT_OF_ORDER,
    POLICY,
    TRAINER_UNAVAILABLE,
    UNAUTHORIZED,
    UPDATE_FAILED,
)
from peft_lalora_relay.packed import pack, unpack
from peft_lalora_relay.records import CONFIG, DELTA, GLOBAL, METRICS, NODE, PRIVACY  # noqa: F401

from ..owner.local_round import partition_id  # noqa: F401
from ..owner.wire import tensors_of


def pack_state(state: dict) -> ArrayRecord:
    """`state` (name -> tensor) as a packed record of float32 tensors."""
    return pack(save_tensors({n: t.detach().to("cpu", torch.float32).contiguous() for n, t in state.items()}))


def state_of(record: ArrayRecord) -> dict:
    """The tensors of a packed record, float32; ValueError (or `WireError`, one) for any other record."""
    return {n: t.to(torch.float32) for n, t in tensors_of(unpack(record)).items()}
