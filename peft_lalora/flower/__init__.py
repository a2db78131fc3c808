"""The cross-machine engine: LA-LoRA (or a baseline) as a Flower app. Each SuperNode holds one client's data and
its own privacy ledger; the ServerApp runs the public schedule and aggregates with the library's `Aggregator`.

Install with `pip install "peft_lalora[flower]"`. This is the only part of peft_lalora that imports `flwr`.

    from peft_lalora.flower import FlowerTask, make_client_app, make_server_app

    TASK = FlowerTask(build_model=..., load_client_data=...)
    server_app = make_server_app(TASK)   # [tool.flwr.app.components] serverapp = "my_app.apps:server_app"
    client_app = make_client_app(TASK)   # clientapp = "my_app.apps:client_app"
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'peft_lalora.flower needs Flower: install it with `pip install "peft_lalora[flower]"` (flwr==1.42.*).'
    ) from exc

from ..owner.state import ClientState
from ..owner.task import TrainingTask as FlowerTask  # one task object for both: Flower-free
from .client_app import make_client_app
from .outcome import FlowerRunError, QuorumUnreachable
from .server_app import make_server_app
from .strategy import LALoraStrategy

__all__ = [
    "ClientState",
    "FlowerRunError",
    "FlowerTask",
    "LALoraStrategy",
    "QuorumUnreachable",
    "make_client_app",
    "make_server_app",
]
