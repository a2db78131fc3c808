"""One run per folder: a new run never mixes with the run an `output_dir` already holds, and a stock-LoRA export
never replaces an LA-LoRA adapter's privacy card."""

import json
import os

import pytest
from fed_helpers import make_trainer

import peft_lalora
from peft_lalora import ConfigError
from peft_lalora.federated.checkpoint import STATE_DIR


def snapshot(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def first_run(folder, holds: str):
    """A finished run in `folder` that left its checkpoint, its saved adapter folder, or both."""
    trainer = make_trainer(folder, num_rounds=1, save_strategy="no" if holds == "adapter" else "steps")
    trainer.train()
    if holds != "checkpoint":
        trainer.save_model()
    return trainer


@pytest.mark.parametrize("holds", ["checkpoint", "adapter", "both"])
def test_new_run_in_a_folder_holding_another_run_is_refused(tmp_path, holds):
    # Prepare
    first_run(tmp_path, holds)
    before = snapshot(tmp_path)
    assert (STATE_DIR in os.listdir(tmp_path)) == (holds != "adapter")
    # Execute
    second = make_trainer(tmp_path, num_rounds=1, dp=False)
    with pytest.raises(
        ConfigError,
        match=r"`output_dir` .* holds another run .*fresh `output_dir`.*"
        r"resume_from_checkpoint=True.*overwrite_output_dir=True",
    ):
        second.train()
    # Assert: nothing written, nothing removed
    assert snapshot(tmp_path) == before


def test_overwrite_output_dir_removes_the_old_run_before_training(tmp_path):
    # Prepare: a private run with its checkpoint, adapter, card and privacy report
    first_run(tmp_path, "both")
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "pooling.safetensors").write_bytes(
        b"the old run's pooler statistics"
    )  # would load with the new adapter
    # Execute: a non-private run that writes no checkpoint, allowed to overwrite
    second = make_trainer(tmp_path, num_rounds=1, dp=False, save_strategy="no", overwrite_output_dir=True)
    second.train()
    # Assert: none of the old run's artifacts survive training, the user's file does
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    second.save_model()
    assert json.loads((tmp_path / "privacy_report.json").read_text())["dp"] is False
    assert "trained without differential privacy" in (tmp_path / "README.md").read_text()
    assert not (tmp_path / STATE_DIR).exists()


def test_an_empty_or_unrelated_folder_is_fine(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's own file")
    make_trainer(tmp_path, num_rounds=1).train()
    assert (tmp_path / STATE_DIR / "state.json").is_file() and (tmp_path / "notes.txt").is_file()


def test_export_as_lora_refuses_a_folder_holding_a_privacy_card(tmp_path):
    # Prepare: the folder `save_model` writes (adapter, privacy card, report)
    trainer = make_trainer(tmp_path / "run", num_rounds=1, save_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    before = snapshot(tmp_path / "final")
    # Execute / Assert: refused, the card and the LALORA config untouched
    with pytest.raises(ConfigError, match=r"`save_directory` .*final.* holds an LA-LoRA adapter.*another folder"):
        peft_lalora.export_as_lora(trainer.model, str(tmp_path / "final"))
    assert snapshot(tmp_path / "final") == before
    # a card alone (adapter files removed) is refused too
    for name in ("adapter_config.json", "adapter_model.safetensors", "privacy_report.json"):
        os.remove(tmp_path / "final" / name)
    with pytest.raises(ConfigError, match="privacy card"):
        peft_lalora.export_as_lora(trainer.model, str(tmp_path / "final"))
    # a fresh folder, and then the same export folder again, are fine
    peft_lalora.export_as_lora(trainer.model, str(tmp_path / "export"))
    peft_lalora.export_as_lora(trainer.model, str(tmp_path / "export"))
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
