"""The data owner's side: a private trainer that alone reads a client's data and secret, trains under DP, charges its
ledger and releases only noised updates within its own policy, to a local caller over a Unix socket. Flower-free:
Flower's ClientApp (relay mode) is its first caller; `relay.TrainerRelay` serves any other engine.

    lalora-private-trainer --config owner.toml        (see `config` for the file's keys)
"""

from peft_lalora_relay.relay import TrainerUnavailable

from .config import OwnerConfig
from .policy import NodePolicy
from .relay import TrainerRelay
from .state import ClientState
from .task import TrainingTask
from .trainer import PrivateTrainer

__all__ = [
    "ClientState",
    "NodePolicy",
    "OwnerConfig",
    "PrivateTrainer",
    "TrainerRelay",
    "TrainerUnavailable",
    "TrainingTask",
]
