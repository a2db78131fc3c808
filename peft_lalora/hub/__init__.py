"""Model cards (`card`) and Hub pushes (`push`) for LA-LoRA adapters."""

from .card import render_model_card, write_model_card
from .push import push_adapter_folder

__all__ = ["push_adapter_folder", "render_model_card", "write_model_card"]
