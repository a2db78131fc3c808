"""Model cards and pushing an aggregated adapter to the Hub, against a local fake Hub (tests/hub_server.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from hub_server import FakeHub
from huggingface_hub import ModelCard, constants
from peft import get_peft_model
from safetensors.torch import load_file

import peft_lalora.hub.push as push_module
from peft_lalora import ConfigError, HubError, LALoraConfig, LALoraWarning
from peft_lalora.hub import push_adapter_folder, render_model_card, write_model_card

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "privacy_report.json"}
REPORT = {
    "epsilon": 1.0,
    "delta": 1e-5,
    "noise_multiplier": 1.2,
    "per_sample_max_grad_norm": 1.0,
    "accountant": "rdp",
    "unit": "one example of one client",
    "clients": [
        {"client": 0, "epsilon": 0.8125, "sample_rate": 0.05, "steps": 10},
        {"client": 1, "epsilon": 1.0, "sample_rate": 0.1, "steps": 20},
    ],
}
FEDERATED = {"num_clients": 8, "clients_per_round": 4, "num_rounds": 5, "local_steps": 10, "dirichlet_alpha": 0.5}
METRICS = {"eval_accuracy": 0.8765, "eval_loss": 0.4321}
BASE = "tiny-roberta"


def card_kwargs(**overrides):
    config = LALoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS").to_dict()
    kwargs = dict(
        base_model=BASE,
        adapter_config=config,
        privacy_report=REPORT,
        federated=FEDERATED,
        metrics=METRICS,
        dataset="glue/sst2",
        repo_id="alice/lalora-sst2",
    )
    kwargs.update(overrides)
    return kwargs


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def snapshot(folder: str) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as fh:
            out[name] = fh.read()
    return out


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(saved_adapter, tmp_path_factory):
    """The shared saved adapter (conftest.py) copied to a folder of its own, with a privacy report and its card."""
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    shutil.copytree(saved_adapter.adapter, folder)
    (folder / "privacy_report.json").write_text(json.dumps(REPORT))
    write_model_card(
        str(folder), base_model=saved_adapter.base, federated=FEDERATED, metrics=METRICS, repo_id="alice/lalora-sst2"
    )
    return {
        "folder": str(folder),
        "base": saved_adapter.base,
        "inputs": saved_adapter.inputs_file,
        "logits": saved_adapter.logits,
    }


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The fake Hub, with huggingface_hub in this process pointed at it and a write token in HF_TOKEN."""
    server = FakeHub()
    url = server.start()
    for name in ("TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_write")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    if hasattr(constants, "AGENT_HARNESSES_PATH"):  # huggingface_hub caches its telemetry registry there
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf_home" / ".agent_harnesses.json"))
    waits = []
    monkeypatch.setattr(push_module.time, "sleep", waits.append)  # record the backoff instead of sleeping
    server.waits = waits
    yield server
    server.stop()


# -- model card --------------------------------------------------------------------------------------------------
def test_card_front_matter_and_sections():
    card = render_model_card(**card_kwargs())
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == BASE
    assert meta["tags"] == ["peft", "lalora", "lora", "differential-privacy", "federated-learning"]
    result = meta["model-index"][0]["results"][0]
    assert result["task"]["type"] == "text-classification" and result["dataset"]["name"] == "glue/sst2"
    assert {(m["name"], m["value"]) for m in result["metrics"]} == {("eval_accuracy", 0.8765)}  # a loss is no result
    assert (
        "**LA-LoRA**" in card
        and "| `lowpass` (Gaussian low-pass filter on the active factor's noisy gradient) | on |" in card
    )
    assert "(epsilon = 1.0, delta = 1e-05)-differential privacy" in card
    assert (
        "| noise multiplier sigma | 1.2 |" in card
        and "| sample rate q (min / max over clients) | 0.05 / 0.1 |" in card
    )
    assert "| accountant | `rdp` |" in card and "one example of one client" in card
    assert "| eval_accuracy | 0.8765 |" in card and "| clients (`num_clients`) | 8 |" in card
    assert "| rank `r` | 4 |" in card and "`query`, `value`" in card
    assert "import peft_lalora" in card and 'PeftModel.from_pretrained(base, "alice/lalora-sst2")' in card
    assert "peft_lalora.export_as_lora" in card and "AutoModelForSequenceClassification" in card
    assert "arXiv" in card and "2602.19926" in card and "Liu and Miao and Xi and Liu" in card and "ICLR" in card
    assert "${" not in card


def test_card_metadata_parses_with_huggingface_hub():
    card = ModelCard(render_model_card(**card_kwargs()))
    assert card.data.library_name == "peft" and card.data.base_model == BASE
    results = {(r.metric_type, r.metric_value, r.dataset_name, r.task_type) for r in card.data.eval_results}
    assert results == {("accuracy", 0.8765, "glue/sst2", "text-classification")}


def test_card_shows_trainer_report_fields():
    report = {**REPORT, "target_epsilon": 2.0, "worst_case_epsilon": 1.75, "dp": True}
    card = render_model_card(**card_kwargs(privacy_report=report))
    assert "| target epsilon | 2.0 |" in card and "| epsilon bound for a client in every round | 1.75 |" in card
    non_dp = {"epsilon": float("inf"), "delta": None, "noise_multiplier": 0.0, "dp": False, "clients": []}
    assert "trained without differential privacy" in render_model_card(**card_kwargs(privacy_report=non_dp))


@pytest.mark.parametrize(
    "alternation, lowpass, name",
    [
        ("local", True, "LA-LoRA"),
        ("local", False, "LA-LoRA without filter"),
        ("round", False, "RoLoRA"),
        ("freeze_a", False, "FFA-LoRA"),
        ("none", False, "DP-LoRA"),
    ],
)
def test_card_method_name_follows_schedule(alternation, lowpass, name):
    config = LALoraConfig(r=2, lora_alpha=4, target_modules=["query"], alternation=alternation, lowpass=lowpass)
    card = render_model_card(**card_kwargs(adapter_config=config.to_dict()))
    assert f"| method | {name} |" in card


def test_card_without_dp_says_so():
    card = render_model_card(**card_kwargs(privacy_report=None, metrics={}))
    assert "trained without differential privacy" in card and "epsilon" not in card
    assert "model-index" not in front_matter(card) and "No evaluation results were reported." in card


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"federated": {"num_clients": 8}}, r"`federated` must hold .*clients_per_round"),
        (
            {"privacy_report": {k: v for k, v in REPORT.items() if k != "delta"}},
            r"`privacy_report` must hold \['delta'\]",
        ),
        ({"metrics": {"accuracy": "high"}}, r"`metrics` must map names to numbers, got 'accuracy': 'high'"),
        (
            {"adapter_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q"], "peft_type": "LORA"}},
            r"`adapter_config` must hold \['alternation'\]",
        ),
        ({"base_model": ""}, r"`base_model` must be a non-empty"),
    ],
)
def test_card_bad_input(overrides, match):
    with pytest.raises(ConfigError, match=match):
        render_model_card(**card_kwargs(**overrides))


def test_write_model_card_defaults_and_atomic(adapter, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    files = snapshot(adapter["folder"])
    (folder / "adapter_model.safetensors").write_bytes(files["adapter_model.safetensors"])
    config = json.loads(files["adapter_config.json"])
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(ConfigError, match="`base_model` was not given"):
        write_model_card(str(folder), privacy_report=None, federated=FEDERATED, metrics=METRICS)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": adapter["base"]}))
    with pytest.raises(ConfigError, match="`privacy_report` was not given"):
        write_model_card(str(folder), federated=FEDERATED, metrics=METRICS)
    path = write_model_card(str(folder), privacy_report=None, federated=FEDERATED, metrics=METRICS)
    assert path == str(folder / "README.md") and sorted(os.listdir(folder)) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    )  # no temporary file left behind
    card = (folder / "README.md").read_text()
    assert front_matter(card)["base_model"] == adapter["base"]  # taken from adapter_config.json
    assert "trained without differential privacy" in card


# -- push and load ----------------------------------------------------------------------------------------------
LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    import peft_lalora
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification
    base_dir, repo_id, folder, inputs_path, out = sys.argv[1:]
    inputs = load_file(inputs_path)
    out_tensors = {}
    for key, source in (("hub", repo_id), ("local", folder)):
        base = AutoModelForSequenceClassification.from_pretrained(base_dir)
        model = PeftModel.from_pretrained(base, source).eval()
        assert type(model.peft_config["default"]).__name__ == "LALoraConfig"
        with torch.no_grad():
            out_tensors[key] = model(**inputs).logits
    save_file(out_tensors, out)
""")


def test_push_one_commit_then_load_from_hub(adapter, hub, tmp_path):
    before = snapshot(adapter["folder"])
    (tmp_path / "extra").mkdir()
    url = push_adapter_folder(adapter["folder"], "alice/lalora-sst2")
    assert snapshot(adapter["folder"]) == before
    repo = hub.repos["alice/lalora-sst2"]
    assert len(repo.commits) == 1 and url == f"{hub.url}/alice/lalora-sst2/commit/{repo.commits[0].oid}"
    assert repo.commits[0].summary == "Upload LA-LoRA adapter"
    assert set(repo.commits[0].files) == FILES and {k: before[k] for k in FILES} == repo.commits[0].files
    assert hub.count("POST", r"/commit/") == 1 and not repo.private

    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "fresh_home"),
        "PYTHONPATH": ROOT,
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    out = tmp_path / "logits.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_SCRIPT,
            adapter["base"],
            "alice/lalora-sst2",
            adapter["folder"],
            adapter["inputs"],
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hub.count("GET", r"^/alice/lalora-sst2/resolve/main/adapter_model.safetensors$") == 1
    logits = load_file(str(out))
    torch.testing.assert_close(logits["hub"], logits["local"], atol=0, rtol=0)
    torch.testing.assert_close(logits["hub"], adapter["logits"], atol=0, rtol=0)


def test_push_uploads_only_adapter_files(adapter, hub, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name, data in snapshot(adapter["folder"]).items():
        if name in ("adapter_config.json", "adapter_model.safetensors"):
            (folder / name).write_bytes(data)
    (folder / "optimizer_state.safetensors").write_bytes(b"not for the Hub")
    with pytest.warns(LALoraWarning, match="no README.md"):
        push_adapter_folder(str(folder), "alice/bare", private=True, commit_message="bare adapter")
    repo = hub.repos["alice/bare"]
    assert set(repo.files) == {"adapter_config.json", "adapter_model.safetensors"} and repo.private
    assert repo.commits[0].summary == "bare adapter"
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")  # peft's card
    with pytest.warns(LALoraWarning, match="not an LA-LoRA model card"):
        push_adapter_folder(str(folder), "alice/bare")
    assert len(repo.commits) == 2 and set(repo.commits[1].files) == {"README.md"}  # unchanged files skipped


# -- errors: HubError, nothing committed, local files byte-identical -------------------------------------------------
def _assert_refused(adapter, hub, match, **kwargs):
    before = snapshot(adapter["folder"])
    with pytest.raises(HubError, match=match):
        push_adapter_folder(adapter["folder"], "alice/lalora-sst2", **kwargs)
    assert snapshot(adapter["folder"]) == before
    assert not any(repo.commits for repo in hub.repos.values())


def test_no_token(adapter, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    _assert_refused(adapter, hub, r"no Hugging Face token found.*hf auth login.*token=.*HF_TOKEN")
    assert hub.count("POST", "") == 0


@pytest.mark.parametrize("how", ["env", "constant"])
def test_offline(adapter, hub, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _assert_refused(adapter, hub, r"offline mode is on.*Unset it")
    assert hub.count("POST", "") == 0


@pytest.mark.parametrize("token, status", [("hf_not_a_token", 401), ("hf_read", 403)])
def test_token_refused(adapter, hub, token, status):
    _assert_refused(adapter, hub, rf"HTTP {status}.*invalid or has no write access.*hf auth login", token=token)
    assert hub.waits == []  # not retried


def test_persistent_5xx_bounded_retries(adapter, hub):
    hub.fail_next(503, 100)
    _assert_refused(adapter, hub, r"failed after 4 attempts: HTTP 503.*`max_retries` \(got 3\)", backoff=0.5)
    assert hub.count("POST", r"^/api/repos/create$") == 4  # 1 + max_retries attempts, each stopped at create_repo
    assert hub.waits == [0.5, 1.0, 2.0]


def test_transient_5xx_then_success(adapter, hub):
    before = snapshot(adapter["folder"])
    hub.fail_next(502, 2)
    push_adapter_folder(adapter["folder"], "alice/lalora-sst2", max_retries=2, backoff=0.25)
    assert snapshot(adapter["folder"]) == before and hub.waits == [0.25, 0.5]
    assert hub.count("POST", r"^/api/repos/create$") == 3
    repo = hub.repos["alice/lalora-sst2"]
    assert len(repo.commits) == 1 and set(repo.files) == FILES


def test_5xx_on_the_commit_is_retried_without_duplicate(adapter, hub):
    hub.fail_next(500, 1, path=r"/commit/")
    push_adapter_folder(adapter["folder"], "alice/lalora-sst2", backoff=0.1)
    assert hub.count("POST", r"/commit/") == 2 and hub.waits == [0.1]
    repo = hub.repos["alice/lalora-sst2"]
    assert len(repo.commits) == 1 and set(repo.files) == FILES


def test_missing_required_file_and_bad_args(adapter, hub, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(HubError, match="has no adapter_model.safetensors"):
        push_adapter_folder(str(tmp_path), "alice/x")
    with pytest.raises(ConfigError, match=r"`max_retries` must be an integer >= 0, got -1"):
        push_adapter_folder(adapter["folder"], "alice/x", max_retries=-1)
    with pytest.raises(ConfigError, match=r"`repo_id` must look like 'namespace/name'"):
        push_adapter_folder(adapter["folder"], "a/b/c")
    assert hub.repos == {}


def test_trainer_push_to_hub_uploads_the_aggregated_adapter(hub, tmp_path):
    from fed_helpers import make_trainer

    trainer = make_trainer(
        tmp_path / "run", num_rounds=1, hub_model_id="alice/fed-run", target_epsilon=3.0, noise_seed=None
    )  # a real private run: secret noise
    trainer.train()
    url = trainer.push_to_hub()
    repo = hub.repos["alice/fed-run"]
    assert len(repo.commits) == 1 and url.endswith(repo.commits[0].oid)
    assert set(repo.commits[0].files) == FILES
    card = repo.commits[0].files["README.md"].decode()
    epsilon = trainer.privacy_report()["epsilon"]
    assert f"{epsilon:.4g}" in card and "import peft_lalora" in card
    local = (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    assert repo.commits[0].files["adapter_model.safetensors"] == local


def test_trainer_with_a_named_adapter_saves_at_the_top_then_loads_and_pushes(hub, tmp_path):
    from fed_helpers import toy_args, toy_dataset
    from peft import PeftModel
    from tiny_models import text_inputs, tiny_roberta

    from peft_lalora import FederatedDPTrainer

    # Prepare: an adapter named "client_adapter", which peft's save_pretrained would put in a subfolder
    config = LALoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(tiny_roberta(0), config, adapter_name="client_adapter")
    args = toy_args(tmp_path / "run", num_rounds=1, hub_model_id="alice/named", target_epsilon=3.0, noise_seed=None)
    trainer = FederatedDPTrainer(model=model, args=args, train_dataset=toy_dataset())
    trainer.train()
    # Execute
    trainer.push_to_hub()
    # Assert: adapter, card and report side by side; peft loads the folder; the Hub got all four files
    folder = tmp_path / "run"
    assert FILES <= set(os.listdir(folder)) and not (folder / "client_adapter").exists()
    loaded = PeftModel.from_pretrained(tiny_roberta(0), str(folder)).eval()
    inputs = text_inputs()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert set(hub.repos["alice/named"].commits[0].files) == FILES


def test_fixed_noise_seed_folder_is_not_pushed_unless_allowed(adapter, hub, tmp_path):
    # Prepare: the adapter folder with a report whose noise came from a fixed seed
    folder = tmp_path / "fixed"
    folder.mkdir()
    for name, data in snapshot(adapter["folder"]).items():
        (folder / name).write_bytes(data)
    report = {**REPORT, "secret_randomness": False, "noise_seed_warning": "noise_seed=3 was fixed."}
    (folder / "privacy_report.json").write_text(json.dumps(report))
    before = snapshot(str(folder))
    # Execute / Assert: refused before anything leaves, then pushed with the explicit override
    with pytest.raises(
        HubError, match=r"`secret_randomness: false`.*no privacy guarantee.*allow_fixed_noise_seed=True"
    ):
        push_adapter_folder(str(folder), "alice/fixed")
    assert snapshot(str(folder)) == before and hub.repos == {}
    with pytest.warns(LALoraWarning, match="fixed noise seed"):
        push_adapter_folder(str(folder), "alice/fixed", allow_fixed_noise_seed=True)
    assert set(hub.repos["alice/fixed"].files) == FILES


def test_trainer_push_passes_allow_fixed_noise_seed(hub, tmp_path):
    from fed_helpers import make_trainer

    trainer = make_trainer(tmp_path / "run", num_rounds=1, hub_model_id="alice/seeded")
    trainer.train()
    report = trainer.privacy_report()
    trainer.privacy_report = lambda: {**report, "secret_randomness": False, "noise_seed_warning": "seed fixed"}
    with pytest.raises(HubError, match="allow_fixed_noise_seed"):
        trainer.push_to_hub()
    assert hub.repos == {}
    trainer.args.allow_fixed_noise_seed = True  # the argument of a run that fixed `noise_seed` on purpose
    with pytest.warns(LALoraWarning, match="fixed noise seed"):
        trainer.push_to_hub()
    card = hub.repos["alice/seeded"].files["README.md"].decode()
    assert "Warning: no privacy guarantee" in card and "differential-privacy" not in card


def test_push_to_hub_without_a_repo_id_is_refused_before_training(tmp_path):
    from fed_helpers import toy_args

    with pytest.raises(ConfigError, match=r"`push_to_hub=True` needs `hub_model_id`.*got None"):
        toy_args(tmp_path / "run", push_to_hub=True)
