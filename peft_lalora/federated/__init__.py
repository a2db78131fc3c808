"""Federated building blocks, the round as a public API that the in-process trainer and the Flower apps share:
client partitions, the client update, the round's server policy (`RoundPolicy`, aggregation rules in `rules`,
client-level DP in `client_dp`), seeding and checkpoints."""

from .aggregation import Aggregator, adapter_delta, apply_delta
from .client import ClientShard, model_columns
from .client_update import ClientUpdate, ClientUpdateError, LocalConfig, client_update, make_optimizer, make_stepper
from .output_dir import prepare_output_dir
from .partition import partition_dataset, partition_dirichlet, partition_groups, partition_iid
from .round import RoundPolicy

__all__ = [
    "Aggregator",
    "ClientShard",
    "ClientUpdate",
    "ClientUpdateError",
    "LocalConfig",
    "RoundPolicy",
    "adapter_delta",
    "apply_delta",
    "client_update",
    "make_optimizer",
    "make_stepper",
    "model_columns",
    "partition_dataset",
    "partition_dirichlet",
    "partition_groups",
    "partition_iid",
    "prepare_output_dir",
]
