"""transformers' PEFT integration (`PreTrainedModel.add_adapter`, `set_adapter`, `active_adapters`,
`disable_adapters`, `get_adapter_state_dict`, `load_adapter`) with LA-LoRA adapters, on the installed transformers.

transformers refuses these methods when the installed peft is older than its integration's `MIN_PEFT_VERSION`
(5.24 asks for peft >= 0.22, which does not exist): setup.cfg pins a pair where they work, and these tests fail
on any pair where they do not.
"""

from __future__ import annotations

import torch
from peft import get_peft_model
from tiny_models import TEXT_KW, randomize_lora, text_inputs, tiny_bert

import peft_lalora  # noqa: F401  (registers LALORA)
from peft_lalora import LALoraConfig

TARGETS = ["query", "value"]


def _config(**kwargs) -> LALoraConfig:
    return LALoraConfig.for_method("lalora", r=4, lora_alpha=8, target_modules=TARGETS, **kwargs)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_set_adapter_and_active_adapters_switch_between_lalora_adapters():
    # Prepare: two LA-LoRA adapters with different weights on one transformers model
    model, inputs = tiny_bert(), text_inputs()
    model.add_adapter(_config(), adapter_name="first")
    model.add_adapter(_config(), adapter_name="second")
    randomize_lora(model, seed=1)
    # Execute
    model.set_adapter("first")
    active_first, logits_first = model.active_adapters(), _logits(model, inputs)
    model.set_adapter("second")
    active_second, logits_second = model.active_adapters(), _logits(model, inputs)
    # Assert
    assert active_first == ["first"] and active_second == ["second"]
    assert not torch.allclose(logits_first, logits_second, atol=1e-3)
    model.set_adapter("first")
    torch.testing.assert_close(_logits(model, inputs), logits_first, atol=1e-6, rtol=0)


def test_disable_adapters_gives_the_base_model_logits_and_enable_restores_the_adapter():
    model, inputs = tiny_bert(), text_inputs()
    base_logits = _logits(model, inputs)
    model.add_adapter(_config())
    randomize_lora(model, seed=2)
    adapted = _logits(model, inputs)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)

    model.disable_adapters()
    torch.testing.assert_close(_logits(model, inputs), base_logits, atol=1e-6, rtol=0)
    model.enable_adapters()
    torch.testing.assert_close(_logits(model, inputs), adapted, atol=1e-6, rtol=0)


def test_get_adapter_state_dict_returns_exactly_the_lora_factors():
    model = tiny_bert()
    model.add_adapter(_config())
    randomize_lora(model, seed=3)

    state = model.get_adapter_state_dict()

    expected = {
        f"bert.encoder.layer.{i}.attention.self.{m}.lora_{f}.weight"
        for i in range(TEXT_KW["num_hidden_layers"])
        for m in TARGETS
        for f in "AB"
    }
    assert set(state) == expected
    params = dict(model.named_parameters())
    for key, value in state.items():
        torch.testing.assert_close(value, params[key.replace(".weight", ".default.weight")], atol=0, rtol=0)
    assert state["bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (4, TEXT_KW["hidden_size"])


def test_load_adapter_of_a_saved_lalora_folder_reproduces_the_peft_model(tmp_path):
    # Prepare: an LA-LoRA adapter (LoRA factors and the classification head) trained elsewhere, saved by peft
    inputs = text_inputs()
    peft_model = get_peft_model(tiny_bert(seed=0), _config(task_type="SEQ_CLS"))
    randomize_lora(peft_model, seed=4)
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)
    expected = _logits(peft_model.eval(), inputs)
    peft_model.save_pretrained(tmp_path)
    # Execute: transformers' own loading path on a fresh copy of the same base model
    model = tiny_bert(seed=0)
    base_logits = _logits(model, inputs)
    model.load_adapter(str(tmp_path), adapter_name="published")
    # Assert
    assert model.active_adapters() == ["published"]
    assert type(model.peft_config["published"]) is LALoraConfig
    torch.testing.assert_close(_logits(model, inputs), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(expected, base_logits, atol=1e-3)
