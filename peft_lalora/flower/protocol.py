"""What travels between the ServerApp and a ClientApp: record names, config keys and error codes.

Server -> client (train): `global` (ArrayRecord: every adapter tensor, float32) and `config` (ConfigRecord:
`round` (0-based, as in `FederatedDPTrainer`), `learning-rate`, `local-steps`, `seed` (the public seed)).
Client -> server: `delta` (ArrayRecord: only the tensors it trained, plus the head), `metrics` (MetricRecord:
`num-examples`, `steps`, `epsilon`, `bytes-sent`, `train-seconds`; `loss`, `sampled`, `dropped` only where the
node shares them or the run is not private) and `privacy` (ConfigRecord: the client's accounting, see
`client_app.privacy_record`), or an error reply with one of the codes below.
Query: the server asks a node which client it is; the reply is `node` (ConfigRecord: `partition-id`).
"""

from __future__ import annotations

from ..errors import ConfigError

GLOBAL, CONFIG, DELTA, METRICS, PRIVACY, NODE = "global", "config", "delta", "metrics", "privacy", "node"

# Error replies (flwr's own codes are < 100)
BUDGET_EXCEEDED = 100  # the round would exceed the client's budget: refused, nothing trained or charged
CLIENT_CONFIG = 101  # the run's settings or the node's config / data are invalid: nothing trained or charged
UPDATE_FAILED = 102  # the local round failed after its charge (e.g. every sampled gradient was non-finite)
POLICY = (
    103  # the run's settings break the node's own privacy policy (`policy.NodePolicy`): nothing trained or charged
)
NOT_CHARGED = (BUDGET_EXCEEDED, CLIENT_CONFIG, POLICY)  # any other failure may come after the client's charge
ERROR_NAMES = {
    BUDGET_EXCEEDED: "budget exceeded",
    CLIENT_CONFIG: "invalid configuration",
    UPDATE_FAILED: "update failed",
    POLICY: "refused by the node's policy",
}


def partition_id(node_config) -> int:
    """The client id of a SuperNode (`node_config["partition-id"]`), which the public schedule selects."""
    value = node_config.get("partition-id")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"`partition-id` (node_config) must be an integer >= 0, the client's id in the public "
            f"schedule, got {value!r}. Start the SuperNode with --node-config 'partition-id=0 ...'."
        )
    return value
