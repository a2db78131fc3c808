"""What travels between the ServerApp and a ClientApp: record names, config keys and error codes.

Server -> client (train): `global` (ArrayRecord: every adapter tensor, float32) and `config` (ConfigRecord:
`round` (0-based, as in `FederatedDPTrainer`), `learning-rate`, `local-steps`, `seed` (the public seed)).
Client -> server: `delta` (ArrayRecord: only the tensors it trained, plus the head), `metrics` (MetricRecord:
`num-examples`, `steps`, `epsilon`, `bytes-sent`, `train-seconds`; `loss`, `sampled`, `dropped` only where the
node shares them or the run is not private) and `privacy` (ConfigRecord: the client's accounting, see
`owner.local_round.privacy_record`), or an error reply with a code of `peft_lalora_relay.codes`.
Query: the server asks a node which client it is; the reply is `node` (ConfigRecord: `partition-id`).
"""

from __future__ import annotations

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
from peft_lalora_relay.records import CONFIG, DELTA, GLOBAL, METRICS, NODE, PRIVACY  # noqa: F401

from ..owner.local_round import partition_id  # noqa: F401
