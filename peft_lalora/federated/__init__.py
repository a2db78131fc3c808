"""Federated building blocks: client partitions, the local round, aggregation, checkpoints."""

from .aggregation import adapter_delta, apply_delta, weighted_mean
from .partition import group_by, partition_dataset, partition_dirichlet, partition_iid

__all__ = [
    "adapter_delta",
    "apply_delta",
    "group_by",
    "partition_dataset",
    "partition_dirichlet",
    "partition_iid",
    "weighted_mean",
]
