"""Safe, atomic artifacts for checkpoints and resumption: only safetensors and JSON, never pickle.

Every write goes through `peft_lalora.atomic.atomic_write_bytes`: a crash at any point leaves either the previous
file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from ..atomic import atomic_write_bytes
from ..errors import AdapterLoadError, CheckpointMismatchError, ConfigError

_MISSING = object()


def save_json(path: str, obj, mode: int = 0o644) -> None:
    """Write `obj` as JSON (sorted keys, indented; `Infinity` allowed for an unbounded epsilon), atomically, with
    file permissions `mode`."""
    try:
        text = json.dumps(obj, sort_keys=True, indent=2, allow_nan=True)
    except TypeError as exc:
        raise ConfigError(
            f"`obj` must be JSON-serialisable (dicts, lists, str, numbers, bool, None) to be saved to {path!r}: "
            f"{exc}. Convert tensors and arrays with `.tolist()`."
        ) from exc
    atomic_write_bytes(path, (text + "\n").encode("utf-8"), mode=mode)


def load_json(path: str):
    """Read a JSON file written by `save_json`; a corrupt file raises `AdapterLoadError` naming it."""
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as exc:
            raise AdapterLoadError(
                f"`path` {path!r} is not valid JSON ({exc}). The file is corrupt: restore it or start a fresh "
                "`output_dir`."
            ) from exc


def save_tensors(path: str, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save `tensors` (moved to CPU, made contiguous, copied so shared storage is fine) as safetensors, atomically."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ConfigError(
            f"`metadata` must map str to str (safetensors stores only strings), got {metadata!r}. "
            "Serialise other values with json.dumps."
        )
    payload = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise ConfigError(f"`tensors` must map str to torch.Tensor, got {name!r}: {type(value).__name__}.")
        payload[name] = value.detach().to("cpu").contiguous().clone()
    atomic_write_bytes(path, safetensors.torch.save(payload, metadata=metadata))


def _check_expected(path: str, tensors: dict[str, Tensor], expected: Mapping[str, tuple]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    misshaped = [
        f"{name}: expected {tuple(expected[name])}, found {tuple(tensors[name].shape)}"
        for name in sorted(set(expected) & set(tensors))
        if tuple(tensors[name].shape) != tuple(expected[name])
    ]
    named = (("missing", missing), ("unexpected", extra), ("wrong shape", misshaped and f"[{'; '.join(misshaped)}]"))
    problems = [f"{what} {found}" for what, found in named if found]
    if problems:
        raise AdapterLoadError(
            f"`path` {path!r} does not match the expected tensors: {', '.join(problems)}. The file was written "
            "for another config (r, target modules, head): load it with that config or retrain."
        )


def load_tensors(path: str, *, expected: Mapping[str, tuple] | None = None) -> dict[str, Tensor]:
    """
    Load a safetensors file (never unpickles). With `expected` (name -> shape), missing, extra or mis-shaped
    tensors raise `AdapterLoadError` listing them all; a non-finite value in any tensor raises it too.
    """
    try:
        tensors = safetensors.torch.load_file(path)
    except SafetensorError as exc:
        raise AdapterLoadError(
            f"`path` {path!r} is not a valid safetensors file ({exc}). Restore it or start a fresh `output_dir`."
        ) from exc
    if expected is not None:
        _check_expected(path, tensors, expected)
    bad = sorted(
        name
        for name, value in tensors.items()
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all())
    )
    if bad:
        raise AdapterLoadError(
            f"`path` {path!r} holds non-finite values (NaN or inf) in {bad}. The run that wrote it diverged: "
            "resume from an earlier checkpoint or lower the learning rate."
        )
    return tensors


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) != isinstance(b, bool):  # True == 1 in Python, but not as a setting
        return False
    return a == b


def _first_difference(saved, current, prefix: str = ""):
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        pairs = [(f"{prefix}.{k}" if prefix else k, saved.get(k, _MISSING), current.get(k, _MISSING)) for k in keys]
    elif isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        pairs = [(f"{prefix}[{i}]", s, c) for i, (s, c) in enumerate(zip(saved, current))]
    else:
        return None if _same(saved, current) else (prefix, saved, current)
    return next(filter(None, (_first_difference(s, c, path) for path, s, c in pairs)), None)


def compare_settings(saved: Mapping, current: Mapping) -> None:
    """
    Raise `CheckpointMismatchError` naming the first field (in sorted order, dotted for nested dicts) whose value
    differs between a checkpoint's saved settings and the resuming run's; tuples and lists compare equal.
    """
    # through JSON, as the checkpoint stored them: tuples become lists, keys strings
    found = _first_difference(json.loads(json.dumps(saved)), json.loads(json.dumps(current)))
    if found is None:
        return
    field, old, new = found
    old_text = "<absent>" if old is _MISSING else repr(old)
    new_text = "<absent>" if new is _MISSING else repr(new)
    raise CheckpointMismatchError(
        f"`{field}` differs from the checkpoint: saved {old_text}, current {new_text}. Resuming with a changed "
        f"setting would make the run and its privacy accounting inconsistent. Start a fresh `output_dir`, or "
        f"restore `{field}` to {old_text} to resume."
    )
