"""Artifacts: atomic writes survive a crash, strict safe loads, settings check."""

import hashlib
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from peft_lalora import AdapterLoadError, CheckpointMismatchError, ConfigError
from peft_lalora.federated.state_io import (
    atomic_write_bytes,
    compare_settings,
    load_json,
    load_tensors,
    save_json,
    save_tensors,
)

A = "lora_A.weight"
B = "lora_B.weight"


def _adapter():
    return {A: torch.arange(6, dtype=torch.float32).reshape(2, 3), B: torch.tensor([[0.5, -1.5]] * 4)}


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_content_and_leaves_no_temp_file(tmp_path):
    # Prepare
    path = tmp_path / "sub" / "f.bin"
    # Execute
    atomic_write_bytes(str(path), b"old")
    atomic_write_bytes(str(path), b"new")
    # Assert
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["f.bin"]


def test_atomic_write_fsyncs_file_before_rename_and_directory_after(tmp_path, monkeypatch):
    # Prepare: record the order of fsync and replace calls
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))) or real_fsync(fd),
    )
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", None)) or real_replace(a, b))
    # Execute
    atomic_write_bytes(str(tmp_path / "f.bin"), b"data")
    # Assert: file fsync (not a directory), then rename, then directory fsync
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]


def _crash_on_replace(monkeypatch):
    def boom(src, dst):
        assert os.path.getsize(src) > 0  # the temporary file was fully written before the "kill"
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(os, "replace", boom)


def test_kill_during_tensor_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    # Prepare
    path = str(tmp_path / "adapter_model.safetensors")
    save_tensors(path, _adapter())
    before = hashlib.sha256(open(path, "rb").read()).hexdigest()
    _crash_on_replace(monkeypatch)
    # Execute
    with pytest.raises(KeyboardInterrupt):
        save_tensors(path, {A: torch.full((2, 3), 9.0), B: torch.zeros(4, 2)})
    # Assert: same bytes, loadable, and the temporary file was cleaned up
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before
    loaded = load_tensors(path, expected={A: (2, 3), B: (4, 2)})
    torch.testing.assert_close(loaded[A], _adapter()[A], rtol=0, atol=0)
    assert os.listdir(tmp_path) == ["adapter_model.safetensors"]


def test_kill_during_json_save_leaves_previous_state_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "state.json")
    save_json(path, {"round": 3})
    _crash_on_replace(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_json(path, {"round": 4})
    assert load_json(path) == {"round": 3}
    assert os.listdir(tmp_path) == ["state.json"]


# ---------------------------------------------------------------- JSON


def test_json_round_trip_sorted_keys_and_infinite_epsilon(tmp_path):
    # Prepare
    path = str(tmp_path / "report.json")
    obj = {"epsilon": float("inf"), "b": [1, 2.5, None, True], "a": {"z": "x", "y": -1}}
    # Execute
    save_json(path, obj)
    text = open(path, encoding="utf-8").read()
    # Assert
    assert load_json(path) == obj
    assert text.index('"a"') < text.index('"b"') < text.index('"epsilon"')
    assert "Infinity" in text


def test_json_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"`obj` must be JSON-serialisable"):
        save_json(str(tmp_path / "x.json"), {"t": torch.zeros(1)})
    assert not os.path.exists(tmp_path / "x.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match=r"is not valid JSON"):
        load_json(str(tmp_path / "bad.json"))


# ---------------------------------------------------------------- tensors


def test_tensor_round_trip_with_metadata_dtypes_and_shared_storage(tmp_path):
    # Prepare: a view sharing storage with another tensor, a bf16 tensor, an int tensor
    base = torch.randn(4, 4)
    tensors = {"full": base, "view": base[1:3], "bf16": torch.randn(3, dtype=torch.bfloat16), "step": torch.tensor(7)}
    path = str(tmp_path / "t.safetensors")
    # Execute
    save_tensors(path, tensors, metadata={"format": "pt", "round": "3"})
    loaded = load_tensors(path)
    # Assert
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value)
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "round": "3"}


def test_save_tensors_rejects_bad_metadata(tmp_path):
    with pytest.raises(ConfigError, match=r"`metadata` must map str to str"):
        save_tensors(str(tmp_path / "t.safetensors"), _adapter(), metadata={"round": 3})


@pytest.mark.parametrize(
    "expected, match",
    [
        ({A: (2, 3), B: (4, 2), "head.weight": (2, 4)}, r"missing \['head.weight'\]"),
        ({A: (2, 3)}, rf"unexpected \['{B}'\]"),
        ({A: (3, 2), B: (4, 2)}, rf"wrong shape \[{A}: expected \(3, 2\), found \(2, 3\)\]"),
    ],
)
def test_strict_load_rejects_missing_extra_and_misshaped(tmp_path, expected, match):
    path = str(tmp_path / "a.safetensors")
    save_tensors(path, _adapter())
    with pytest.raises(AdapterLoadError, match=match):
        load_tensors(path, expected=expected)


def test_strict_load_lists_every_problem_at_once(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_tensors(path, _adapter())
    with pytest.raises(AdapterLoadError, match=r"missing \['c'\], unexpected \['lora_B.weight'\], wrong shape"):
        load_tensors(path, expected={A: (6,), "c": (1,)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_load_rejects_non_finite_naming_the_tensor(tmp_path, bad):
    # Prepare: written with safetensors directly, as a diverged run or a tampered file would be
    path = str(tmp_path / "a.safetensors")
    tensors = _adapter()
    tensors[B][2, 1] = bad
    save_file(tensors, path)
    # Execute / Assert
    with pytest.raises(AdapterLoadError, match=rf"non-finite values \(NaN or inf\) in \['{B}'\]"):
        load_tensors(path, expected={A: (2, 3), B: (4, 2)})


def test_load_rejects_pickle_and_truncated_files(tmp_path):
    # Prepare: a torch.save (pickle) file must never be unpickled
    pickled = tmp_path / "adapter_model.bin"
    torch.save(_adapter(), str(pickled))
    truncated = tmp_path / "t.safetensors"
    save_tensors(str(truncated), _adapter())
    truncated.write_bytes(truncated.read_bytes()[:40])
    # Execute / Assert
    for path in (pickled, truncated):
        with pytest.raises(AdapterLoadError, match=r"is not a valid safetensors file"):
            load_tensors(str(path))


# ---------------------------------------------------------------- settings


def test_compare_settings_accepts_equal_settings_after_json_round_trip(tmp_path):
    current = {"noise_multiplier": 1.1, "target_modules": ("query", "value"), "target_epsilon": float("inf")}
    save_json(str(tmp_path / "s.json"), current)
    assert compare_settings(load_json(str(tmp_path / "s.json")), current) is None  # no error raised


@pytest.mark.parametrize(
    "saved, current, match",
    [
        (
            {"noise_multiplier": 1.1, "r": 8},
            {"noise_multiplier": 0.9, "r": 8},
            r"`noise_multiplier` differs from the checkpoint: saved 1.1, current 0.9\..*fresh `output_dir`.*restore "
            r"`noise_multiplier` to 1.1",
        ),
        ({"a": 1, "r": 8}, {"a": 1, "r": 4, "z": 0}, r"`r` differs.*saved 8, current 4"),
        ({"seed": 0}, {"seed": 0, "num_clients": 10}, r"`num_clients` differs.*saved <absent>, current 10"),
        ({"lora": {"r": 8, "alpha": 16}}, {"lora": {"r": 8, "alpha": 32}}, r"`lora.alpha` differs"),
        ({"modules": ["query", "value"]}, {"modules": ["query", "key"]}, r"`modules\[1\]` differs.*'value'.*'key'"),
        ({"lowpass": 1}, {"lowpass": True}, r"`lowpass` differs.*saved 1, current True"),
    ],
)
def test_compare_settings_names_the_first_differing_field(saved, current, match):
    with pytest.raises(CheckpointMismatchError, match=match):
        compare_settings(saved, current)


def test_settings_mismatch_is_a_value_error():
    # Prepare / Execute / Assert: callers written for peft conventions catch ValueError
    with pytest.raises(ValueError):
        compare_settings({"x": 1}, {"x": 2})
