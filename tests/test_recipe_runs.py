"""The recipes' run handling, in process on the offline vision default (tiny ViT from a config, digits): a round
checkpoint by default, `--resume_from_checkpoint` finishing a killed run, the refusal naming the flags, the saved
base model, the per-mode learning rate and the divergence warning."""

import importlib.util
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from peft_lalora import ConfigError, FederatedDPTrainer, LALoraWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--max_train_samples",
    "120",
    "--max_eval_samples",
    "40",
    "--image_size",
    "8",
    "--num_rounds",
    "2",
    "--local_steps",
    "1",
    "--num_clients",
    "2",
    "--clients_per_round",
    "2",
    "--per_device_train_batch_size",
    "8",
    "--eval_rounds",
    "0",
    "--target_epsilon",
    "8",
    "--noise_seed",
    "0",
]


def _recipe(name: str):
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(ROOT, "recipes", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fed_vision():
    return _recipe("fed_vision")


class Killed(Exception):
    pass


def test_a_killed_recipe_run_is_refused_by_flag_name_and_resumes_to_the_uninterrupted_result(
    fed_vision, tmp_path, monkeypatch
):
    # Prepare: the reference run, uninterrupted; then the same run killed after its first round
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference_result = fed_vision.main([*TINY, "--output_dir", str(whole)])
    run_round = FederatedDPTrainer._run_round

    def dies_in_round_1(self, round_idx):
        if round_idx == 1:
            raise Killed
        return run_round(self, round_idx)

    with monkeypatch.context() as patch:
        patch.setattr(FederatedDPTrainer, "_run_round", dies_in_round_1)
        with pytest.raises(Killed):
            fed_vision.main([*TINY, "--output_dir", str(killed)])
    assert (killed / "federated_state" / "state.json").is_file()  # checkpointed by default
    # Execute / Assert: the plain re-run is refused, naming the recipe flags
    with pytest.raises(ConfigError, match=r"--resume_from_checkpoint True.*--overwrite_output_dir True"):
        fed_vision.main([*TINY, "--output_dir", str(killed)])
    result = fed_vision.main([*TINY, "--output_dir", str(killed), "--resume_from_checkpoint", "True"])
    # Assert: the resumed run ends where the uninterrupted one did, tensor for tensor
    ours, reference = (load_file(str(d / "adapter_model.safetensors")) for d in (killed, whole))
    assert ours.keys() == reference.keys() and ours
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert result["epsilon"] == pytest.approx(reference_result["epsilon"], rel=1e-9)
    assert result["eval_accuracy"] == reference_result["eval_accuracy"]


def test_the_offline_vision_adapter_loads_elsewhere_with_its_saved_base(fed_vision, tmp_path, caplog):
    # Prepare / Execute
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForImageClassification

    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        result = fed_vision.main([*TINY, "--output_dir", str(out)])
    # Assert: the run says it only shows the plumbing
    assert "shows that the job runs end to end" in result["note"]
    assert any("near chance" in r.getMessage() for r in caplog.records)
    # a fresh process's view: the adapter names an existing base folder, and base + adapter reproduce the accuracy
    base_path = PeftConfig.from_pretrained(str(out)).base_model_name_or_path
    assert base_path == str(out / "base_model") and os.path.isfile(os.path.join(base_path, "config.json"))
    model = PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base_path), str(out)).eval()
    _, data_args, _ = fed_vision.parse_args([*TINY])
    _, test, _ = fed_vision.load_splits(data_args, 8, 42)
    batch = fed_vision.data.ImageCollator()([test[i] for i in range(len(test))])
    with torch.no_grad():
        predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
    accuracy = (predictions == batch["labels"]).float().mean().item()
    assert accuracy == pytest.approx(result["eval_accuracy"], abs=1e-6)


def test_without_dp_the_recipes_default_to_the_benchmarks_non_private_learning_rate(fed_vision):
    from common import NONPRIVATE_LEARNING_RATE

    assert fed_vision.parse_args([])[2].learning_rate == 1.0
    assert fed_vision.parse_args(["--dp", "False"])[2].learning_rate == NONPRIVATE_LEARNING_RATE == 0.1
    assert fed_vision.parse_args(["--dp", "False", "--learning_rate", "0.3"])[2].learning_rate == 0.3


def test_a_diverging_non_private_recipe_run_warns_with_its_loss(fed_vision, tmp_path):
    # Prepare: no DP at a rate far too large for unclipped, unnoised steps
    flags = [*TINY[: TINY.index("--target_epsilon")], "--dp", "False", "--learning_rate", "300"]
    # Execute / Assert
    with pytest.warns(LALoraWarning, match=r"training loss of round \d is [0-9.e+]+, over 5x .*Lower `learning_rate`"):
        fed_vision.main([*flags, "--output_dir", str(tmp_path / "run")])


def test_a_busy_machine_with_several_torch_threads_gets_the_omp_hint(fed_vision, monkeypatch, caplog):
    import common

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(common.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    for load, hinted in ((9.5, True), (1.0, False)):
        caplog.clear()
        monkeypatch.setattr(common.os, "getloadavg", lambda load=load: (load, load, load))
        with caplog.at_level("WARNING"):
            common.busy_machine_hint()
        assert any("set OMP_NUM_THREADS=1" in r.getMessage() for r in caplog.records) == hinted
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user chose
    monkeypatch.setattr(common.os, "getloadavg", lambda: (9.5, 9.5, 9.5))
    caplog.clear()
    common.busy_machine_hint()
    assert not caplog.records
