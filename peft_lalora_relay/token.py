"""The shared token file of a private trainer and its callers: hex, at least 32 characters, closed to others."""

from __future__ import annotations

import os
import secrets
import stat


class TokenFileError(ValueError):
    """The token file is missing, open to others or too short (the message says which and the fix)."""


def read_token(path: str, *, create: bool = False) -> str:
    """The shared token (hex) in `path`; `create`: write a fresh one (mode 0640) if the file is missing."""
    if create and not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise TokenFileError(
            f"`token-file` {path!r} cannot be read ({exc.strerror}): start `lalora-private-trainer` first (it "
            "writes the token) and give this user read access to it."
        ) from None
    if mode & 0o007:
        raise TokenFileError(
            f"`token-file` {path!r} has mode {mode:04o}: others may read it. Run `chmod 0640 {path}`."
        )
    with open(path) as handle:
        token = handle.read().strip()
    if len(token) < 32:
        raise TokenFileError(f"`token-file` {path!r} holds {len(token)} characters; write at least 32 (e.g. 64 hex).")
    return token
