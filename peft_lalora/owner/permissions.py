"""The private trainer's start-up check of its own files: the data, the state folder (ledger and secret) must be
closed to everyone but the owner's user, or the guarantee is only as good as the weakest account on the machine
(another user who reads the data needs no relay; one who writes the ledger or reads the secret undoes the budget or
the noise). `check_private_paths` refuses to start, naming the path, its mode and the command that fixes it.

    data folder (`data-path`, `data-dir`)  no write for group or others; no read for others; group read only
                                           with `allow-group-read = true`. Prepared data often keeps 0755 inside a
                                           private folder (e.g. `chmod -R go-rwx` on its parent only), so a folder
                                           whose parents already lock others out passes.
    `state-dir`                            mode 0700 (0750 with `allow-group-read`): this process creates it so.
    `ledger.json`, `.lock`                 no write for group or others.
    `secret.json`                          mode 0600 (written so): nobody else may read it, whatever its parents.

Only the permission bits are read (`os.stat`); ACLs and root are outside this check.
"""

from __future__ import annotations

import os
import stat

from ..errors import ConfigError
from .state import LEDGER_FILE, LOCK_FILE, SECRET_FILE

_DATA_KEYS = ("data-path", "data-dir")


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _reachable(path: str, bits: int) -> bool:
    """Every folder above `path` lets the class of `bits` (0o001 others, 0o011 group or others) pass through."""
    parent = os.path.dirname(os.path.realpath(path))
    while True:
        if not _mode(parent) & bits:
            return False
        if parent == os.path.dirname(parent):
            return True
        parent = os.path.dirname(parent)


def _refuse(key: str, path: str, mode: int, why: str, fix: str) -> None:
    raise ConfigError(
        f"`{key}` {path!r} has mode {mode:04o}: {why}. The private trainer refuses to start; run `{fix}` "
        "(as the owner's user) and start it again."
    )


def check_data(key: str, path: str, allow_group_read: bool = False) -> None:
    mode = _mode(path)
    closed = "chmod -R go-rwx" if not allow_group_read else "chmod -R g-w,o-rwx"
    if mode & 0o022 and _reachable(path, 0o011):
        _refuse(key, path, mode, "its group or others may write it (and change what is trained)", f"{closed} {path}")
    if mode & 0o004 and _reachable(path, 0o001):
        _refuse(key, path, mode, "other users may read it without the relay", f"{closed} {path}")
    if mode & 0o040 and not allow_group_read and _reachable(path, 0o011):
        _refuse(key, path, mode, "its group may read it (`allow-group-read` is not set)", f"{closed} {path}")


def check_state(path: str, allow_group_read: bool = False) -> None:
    mode = _mode(path)
    allowed = 0o750 if allow_group_read else 0o700
    if mode & ~allowed & 0o777:
        _refuse("state-dir", path, mode, "others than the owner may use the ledger's folder", f"chmod 0700 {path}")
    for name in (LEDGER_FILE, LOCK_FILE):
        file = os.path.join(path, name)
        if os.path.exists(file) and _mode(file) & 0o022:
            _refuse("state-dir", file, _mode(file), "its group or others may write it", f"chmod go-w {file}")
    secret = os.path.join(path, SECRET_FILE)
    if os.path.exists(secret) and _mode(secret) & 0o077:
        why = "others than the owner may read the noise's secret"
        _refuse("state-dir", secret, _mode(secret), why, f"chmod 0600 {secret}")


def check_private_paths(node_config: dict, allow_group_read: bool = False) -> None:
    """Refuse (`ConfigError`) a data folder or state folder that others may read or write (see the module)."""
    for key in _DATA_KEYS:
        path = node_config.get(key)
        if isinstance(path, str) and path and os.path.exists(path):
            check_data(key, os.path.abspath(os.path.expanduser(path)), allow_group_read)
    state = node_config.get("state-dir")
    if isinstance(state, str) and state and os.path.isdir(os.path.expanduser(state)):
        check_state(os.path.abspath(os.path.expanduser(state)), allow_group_read)
