"""The ServerApp and the ClientApp of the recipe (pyproject.toml names them)."""

from peft_lalora.flower import make_client_app, make_server_app

from .task import TASK

server_app = make_server_app(TASK)
client_app = make_client_app(TASK)
