"""The private trainer's own config (a TOML or JSON file the data owner writes; no server ever sees it):

task = "lalora_rt.task:TASK"          # `module:attribute` of a `TrainingTask` (a `FlowerTask` is one)
python-path = ["/opt/app"]            # optional: folders to import the task's module from
socket = "/run/lalora/trainer.sock"   # the Unix socket; its folder must be closed to others (see `check_folder`)
token-file = "/run/lalora/token"      # the shared token a caller must present (created, mode 0640, if missing)
max-payload-bytes = 1073741824        # optional: the largest adapter a request may carry
max-models = 2                        # optional: models held in memory at most (one per run; the oldest goes)
request-timeout-s = 10.0              # optional: a caller must send its whole request within this many seconds
allow-group-read = false              # optional: let the data's and the state's group read them (`permissions`)
[node-config]                         # what a SuperNode's --node-config would hold, read by this process only
partition-id = 0
data-path = "/srv/owner/data/client_0"
state-dir = "/srv/owner/state"        # the ledger and the secret randomness
max-epsilon = 8.0                     # the policy keys of `policy` (a run can only tighten them)
min-privacy-unit = "user"             # optional: only user-level runs, users named by the owner's column
user-column = "patient_id"
"""

from __future__ import annotations

import importlib
import json
import os
import stat
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from peft_lalora_relay import token
from peft_lalora_relay.wire import DEFAULT_MAX_PAYLOAD_BYTES

from ..errors import ConfigError
from .task import TrainingTask

DEFAULT_MAX_MODELS = 2
DEFAULT_REQUEST_TIMEOUT_S = 10.0


@dataclass
class OwnerConfig:
    task: str
    socket: str
    token_file: str
    node_config: dict = field(default_factory=dict)
    python_path: tuple = ()
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_models: int = DEFAULT_MAX_MODELS
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    allow_group_read: bool = False

    @classmethod
    def load(cls, path: str) -> OwnerConfig:
        """Read a `.toml` or `.json` file (relative paths in it are relative to the file's folder)."""
        raw = Path(path).read_bytes()
        if path.endswith(".toml"):
            import tomllib

            data = tomllib.loads(raw.decode())
        elif path.endswith(".json"):
            data = json.loads(raw)
        else:
            raise ConfigError(f"`--config` must be a .toml or .json file, got {path!r}.")
        return cls.from_dict(data, base=os.path.dirname(os.path.abspath(path)))

    @classmethod
    def from_dict(cls, data: dict, base: str = ".") -> OwnerConfig:
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ConfigError(f"The private trainer's config holds unknown keys {unknown}; known: {sorted(_KEYS)}.")
        for key in ("task", "socket", "token-file"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ConfigError(
                    f"`{key}` (private trainer config) must be a non-empty string, got {data.get(key)!r}."
                )
        node_config = data.get("node-config", {})
        if not isinstance(node_config, dict):
            raise ConfigError(f"`node-config` must be a table of settings, got {type(node_config).__name__}.")
        group_read = data.get("allow-group-read", False)
        if not isinstance(group_read, bool):
            raise ConfigError(f"`allow-group-read` must be true or false, got {group_read!r}.")

        def here(p):
            return os.path.normpath(os.path.join(base, os.path.expanduser(p)))

        return cls(
            task=data["task"],
            socket=here(data["socket"]),
            token_file=here(data["token-file"]),
            node_config=dict(node_config),
            python_path=tuple(here(p) for p in data.get("python-path", ())),
            max_payload_bytes=_positive(data, "max-payload-bytes", DEFAULT_MAX_PAYLOAD_BYTES, int),
            max_models=_positive(data, "max-models", DEFAULT_MAX_MODELS, int),
            request_timeout_s=float(_positive(data, "request-timeout-s", DEFAULT_REQUEST_TIMEOUT_S, (int, float))),
            allow_group_read=group_read,
        )

    def load_task(self) -> TrainingTask:
        """The task object `module:attribute` (a `TrainingTask`)."""
        module_name, _, attr = self.task.partition(":")
        if not module_name or not attr:
            raise ConfigError(f"`task` must be `module:attribute`, e.g. 'lalora_rt.task:TASK', got {self.task!r}.")
        for folder in reversed(self.python_path):
            if folder not in sys.path:
                sys.path.insert(0, folder)
        task = getattr(importlib.import_module(module_name), attr, None)
        if not isinstance(task, TrainingTask):
            raise ConfigError(
                f"`task` {self.task!r} must name a `TrainingTask` (or `FlowerTask`), got {type(task).__name__}."
            )
        return task


_KEYS = {f.name.replace("_", "-") for f in fields(OwnerConfig)}  # the file's keys: the fields in kebab case


def _positive(data: dict, key: str, default, kind):
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < float("inf"):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"`{key}` (private trainer config) must be {what} > 0, got {value!r}.")
    return value


def check_folder(path: str) -> None:
    """Refuse a socket folder that is not this user's own, or that others may enter or anyone else may write
    (mode 0700, or 0750 for a group shared with the relay's user)."""
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"`socket`'s folder {path!r} is not a folder.")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise ConfigError(
            f"`socket`'s folder {path!r} belongs to uid {info.st_uid}, not to this user ({os.getuid()}): "
            "create it as the private trainer's user (`install -d -m 0700 ...`)."
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o027:
        raise ConfigError(
            f"`socket`'s folder {path!r} has mode {mode:04o}: others may enter it or its group may write. "
            f"Run `chmod 0700 {path}` (or 0750 with a group holding only the relay's user)."
        )


def read_token(path: str, *, create: bool = False) -> str:
    """The shared token (hex) in `path`; `create`: write a fresh one (mode 0640) if the file is missing. The check
    is `peft_lalora_relay.token`'s (the relay ClientApp reads the same file without importing torch)."""
    try:
        return token.read_token(path, create=create)
    except token.TokenFileError as exc:
        raise ConfigError(str(exc)) from None
