"""The ServerApp and the ClientApp of the recipe (pyproject.toml names the ServerApp here and the ClientApp in
`client.py`, whose module imports nothing heavy)."""

from peft_lalora.flower import make_server_app

from .client import client_app
from .task import TASK

server_app = make_server_app(TASK)
__all__ = ["client_app", "server_app"]
