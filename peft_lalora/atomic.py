"""The one atomic file writer of the package (checkpoints, ledgers, privacy reports, model cards).

The data goes to a temporary file in the target's directory, is fsync'ed, then renamed over the target with
`os.replace` (atomic on POSIX), and the directory is fsync'ed: a crash at any point leaves either the previous
file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic there
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically: temporary file in the same directory, fsync, `os.replace`, fsync dir.
    `mode` is set before the rename (0o600 for a file holding secret randomness: never readable by others)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
