"""Model cards and Hub pushes for LA-LoRA adapters.

`render_model_card` / `write_model_card` build the README.md (YAML front matter with model-index, method,
federated setup, privacy guarantee, results, loading instructions, citation); `push_adapter_folder` uploads the
adapter's artifacts in one commit with bounded retries, raising `HubError` on failure.
"""

from .card import render_model_card, write_model_card
from .push import push_adapter_folder

__all__ = ["push_adapter_folder", "render_model_card", "write_model_card"]
