"""Round checkpoints of a federated run: the global adapter (safetensors) and the server state (JSON).

Layout of `<output_dir>/federated_state/`:
    global_adapter-<round>.safetensors   the global adapter after round <round>
    state.json                           the commit point: round, adapter file and its SHA-256, ledger, settings,
                                         log history
Each file is written atomically (temporary file, fsync, rename); `state.json` is written last and names its
adapter file, so a kill at any moment leaves the previous checkpoint loadable. Only then is the older
adapter file removed. All randomness derives from (seed, round, client), so resuming is bit-identical.
"""

from __future__ import annotations

import hashlib
import os

from ..errors import AdapterLoadError
from .state_io import load_json, load_tensors, save_json, save_tensors

STATE_DIR = "federated_state"
STATE_FILE = "state.json"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(directory: str, *, round_idx: int, global_state: dict, server_state: dict) -> str:
    """Write the checkpoint after round `round_idx` (0-based: `round_idx + 1` rounds are done)."""
    adapter_file = f"global_adapter-{round_idx:06d}.safetensors"
    save_tensors(os.path.join(directory, adapter_file), global_state, metadata={"round": str(round_idx)})
    state = dict(
        server_state,
        round=round_idx,
        adapter_file=adapter_file,
        adapter_sha256=_sha256(os.path.join(directory, adapter_file)),
    )
    save_json(os.path.join(directory, STATE_FILE), state, mode=0o600)  # holds the secret root of the noise
    for name in os.listdir(directory):
        if name.startswith("global_adapter-") and name != adapter_file:
            os.remove(os.path.join(directory, name))
    return directory


def load_checkpoint(directory: str, *, expected_shapes: dict) -> tuple[dict, dict]:
    """Read a checkpoint: (server state dict, global adapter tensors). Strict: a missing, extra, mis-shaped or
    non-finite tensor, or an adapter file whose hash does not match, raises `AdapterLoadError`."""
    state_path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(state_path):
        raise AdapterLoadError(
            f"`resume_from_checkpoint` {directory!r} holds no {STATE_FILE}: not a federated "
            "checkpoint. Pass the `federated_state` folder of an earlier run, or True."
        )
    state = load_json(state_path)
    adapter_path = os.path.join(directory, state["adapter_file"])
    if _sha256(adapter_path) != state["adapter_sha256"]:
        raise AdapterLoadError(
            f"{adapter_path!r} does not match the SHA-256 recorded in {state_path!r}; the checkpoint is corrupt."
        )
    return state, load_tensors(adapter_path, expected=expected_shapes)
