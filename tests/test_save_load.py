"""Save / load of LA-LoRA adapters through peft and transformers, in fresh processes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import randomize_lora, text_inputs, tiny_roberta
from transformers import AutoModelForSequenceClassification

import peft_lalora
from peft_lalora import LALoraConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_fresh(code: str, tmp_path, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Run `code` in a new Python process that sees the source tree but has imported nothing yet."""
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def saved(saved_adapter, tmp_path_factory):
    """A working folder for this module's processes (they write there) whose `base`, `adapter` and `inputs.json`
    link to the shared saved adapter (conftest.py), with its model, inputs and reference logits."""
    tmp = tmp_path_factory.mktemp("saved")
    for name in ("base", "adapter", "inputs.json"):
        (tmp / name).symlink_to(saved_adapter.root / name)
    return tmp, saved_adapter.model, saved_adapter.inputs, saved_adapter.logits


LOAD_PREAMBLE = """
import json, torch
from safetensors.torch import save_file
inputs = {k: torch.tensor(v) for k, v in json.load(open("inputs.json")).items()}
def dump(logits):
    save_file({"logits": logits.detach().contiguous()}, "out.safetensors")
"""


def test_saved_config_is_lalora(saved):
    tmp, *_ = saved
    config = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LALORA"
    assert config["alternation"] == "local" and config["alternation_period"] == 2
    assert os.path.exists(tmp / "adapter" / "adapter_model.safetensors")


@pytest.mark.processes
def test_peft_from_pretrained_in_fresh_process(saved):
    tmp, _, _, logits = saved
    run_fresh(
        LOAD_PREAMBLE
        + """
import peft_lalora
from peft import PeftModel, PeftConfig
from transformers import AutoModelForSequenceClassification
base = AutoModelForSequenceClassification.from_pretrained("base").eval()
model = PeftModel.from_pretrained(base, "adapter").eval()
assert type(model.base_model).__name__ == "LALoraModel", type(model.base_model)
assert model.peft_config["default"].alternation_period == 2
dump(model(**inputs).logits)
""",
        tmp,
    )
    torch.testing.assert_close(load_file(tmp / "out.safetensors")["logits"], logits, rtol=0, atol=0)


@pytest.mark.processes
def test_auto_peft_model_in_fresh_process(saved):
    tmp, _, _, logits = saved
    run_fresh(
        LOAD_PREAMBLE
        + """
import peft_lalora
from peft import AutoPeftModelForSequenceClassification
model = AutoPeftModelForSequenceClassification.from_pretrained("adapter").eval()
dump(model(**inputs).logits)
""",
        tmp,
    )
    torch.testing.assert_close(load_file(tmp / "out.safetensors")["logits"], logits, rtol=0, atol=0)


@pytest.mark.processes
def test_transformers_load_adapter_in_fresh_process(saved):
    tmp, _, _, logits = saved
    run_fresh(
        LOAD_PREAMBLE
        + """
import peft_lalora
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained("base").eval()
model.load_adapter("adapter")
dump(model(**inputs).logits)
""",
        tmp,
    )
    torch.testing.assert_close(load_file(tmp / "out.safetensors")["logits"], logits, rtol=1e-6, atol=1e-6)


@pytest.mark.processes
def test_without_import_peft_lalora_plain_peft_fails_until_it_is_imported(saved):
    # Nothing in the environment patches peft (no start-up hook): loading an LALORA adapter without
    # `import peft_lalora` is peft's own KeyError, on every try, and never imports peft_lalora behind the
    # caller's back. The card and the README say to import it first; after that the same call loads.
    tmp, _, _, logits = saved
    run_fresh(
        LOAD_PREAMBLE
        + """
import sys
import peft.mapping
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
assert type(peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING) is dict, type(peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING)
assert type(peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING) is dict, type(peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING)
for attempt in range(2):
    base = AutoModelForSequenceClassification.from_pretrained("base").eval()
    try:
        PeftModel.from_pretrained(base, "adapter")
    except KeyError as exc:
        assert type(exc) is KeyError and exc.args == ("LALORA",), repr(exc)
    else:
        raise AssertionError(f"try {attempt}: an LALORA adapter loaded without import peft_lalora")
    assert "peft_lalora" not in sys.modules
import peft_lalora
base = AutoModelForSequenceClassification.from_pretrained("base").eval()
model = PeftModel.from_pretrained(base, "adapter").eval()
assert type(model.base_model).__name__ == "LALoraModel", type(model.base_model)
dump(model(**inputs).logits)
""",
        tmp,
    )
    torch.testing.assert_close(load_file(tmp / "out.safetensors")["logits"], logits, rtol=0, atol=0)


def test_merge_and_unload_gives_identical_logits(saved):
    tmp, _, inputs, logits = saved
    base = AutoModelForSequenceClassification.from_pretrained(tmp / "base").eval()
    model = PeftModel.from_pretrained(base, tmp / "adapter").eval()
    merged = model.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(**inputs).logits, logits, rtol=1e-5, atol=1e-6)


@pytest.mark.processes
def test_export_as_stock_lora_loads_with_plain_peft(saved):
    tmp, model, _, logits = saved
    peft_lalora.export_as_lora(model, str(tmp / "exported"))
    config = json.loads((tmp / "exported" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "alternation" not in config
    proc = run_fresh(
        LOAD_PREAMBLE
        + """
import sys
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
base = AutoModelForSequenceClassification.from_pretrained("base").eval()
model = PeftModel.from_pretrained(base, "exported").eval()
assert "peft_lalora" not in sys.modules, "plain peft must load the export"
assert type(model.base_model).__name__ == "LoraModel"
dump(model(**inputs).logits)
""",
        tmp,
    )
    assert proc.returncode == 0
    torch.testing.assert_close(load_file(tmp / "out.safetensors")["logits"], logits, rtol=0, atol=0)
    ours = load_file(tmp / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp / "exported" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_several_named_adapters(tmp_path):
    base = tiny_roberta()
    model = get_peft_model(base, LALoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.add_adapter("rolora", LALoraConfig(r=4, target_modules=["value"], task_type="SEQ_CLS", alternation="round"))
    randomize_lora(model)
    inputs = text_inputs()
    model.eval()
    out_default = model(**inputs).logits.detach()
    model.set_adapter("rolora")
    out_second = model(**inputs).logits.detach()
    assert not torch.allclose(out_default, out_second)
    assert model.base_model.trainable_factors(1, 0) == frozenset({"A"})  # the active adapter's schedule
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_roberta(), tmp_path).eval()
    loaded.load_adapter(tmp_path / "rolora", adapter_name="rolora")
    torch.testing.assert_close(loaded(**inputs).logits, out_default, rtol=0, atol=0)
    loaded.set_adapter("rolora")
    torch.testing.assert_close(loaded(**inputs).logits, out_second, rtol=0, atol=0)
    assert loaded.peft_config["rolora"].alternation == "round"


def test_a_crash_while_saving_the_weights_leaves_the_previous_adapter_whole(tmp_path, monkeypatch):
    # Prepare: an adapter saved once, then a second save of other weights that crashes while writing them
    from peft_lalora.tuner import saving

    model = get_peft_model(tiny_roberta(), LALoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    saving.save_adapter_files(model, str(tmp_path), "default")
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    randomize_lora(model, seed=1)
    real = saving.atomic_write_bytes

    def crash_on_weights(path, data, mode=0o644):
        if path.endswith(".safetensors"):
            raise OSError("disk full")
        real(path, data, mode)

    monkeypatch.setattr(saving, "atomic_write_bytes", crash_on_weights)
    # Execute
    with pytest.raises(OSError, match="disk full"):
        saving.save_adapter_files(model, str(tmp_path), "default")
    # Assert: the previous files, byte for byte, and no stray temporary file or folder
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
