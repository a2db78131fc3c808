import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests import the source tree, also in the subprocesses they start.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class SavedAdapter:
    root: Path  # holds `base/`, `adapter/`, `inputs.json` and `inputs.safetensors`
    base: str  # the tiny RoBERTa base model's folder
    adapter: str  # the LA-LoRA adapter's folder, as peft's `save_pretrained` wrote it
    inputs_file: str  # `inputs` as safetensors
    model: object  # the PeftModel that was saved (eval mode)
    inputs: dict
    logits: object  # `model(**inputs).logits`


@pytest.fixture(scope="session")
def saved_adapter(tmp_path_factory) -> SavedAdapter:
    """The saved adapter of the loading tests (read it, write elsewhere): the tiny RoBERTa base saved to disk and
    an LA-LoRA adapter on it (r=4, lora_alpha=8 on query/value, alternation 'local' with period 2, every LoRA
    factor random and non-zero, so it changes the logits), with the inputs and the logits to reproduce."""
    import json

    from peft import get_peft_model
    from safetensors.torch import save_file
    from tiny_models import randomize_lora, text_inputs, tiny_roberta
    from transformers import AutoModelForSequenceClassification

    from peft_lalora import LALoraConfig

    root = tmp_path_factory.mktemp("saved_adapter")
    tiny_roberta().save_pretrained(root / "base")
    base = AutoModelForSequenceClassification.from_pretrained(root / "base").eval()
    base_logits = base(**text_inputs()).logits.detach()
    model = get_peft_model(
        base,
        LALoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            task_type="SEQ_CLS",
            alternation="local",
            alternation_period=2,
        ),
    )
    randomize_lora(model)
    model.eval()
    inputs = text_inputs()
    logits = model(**inputs).logits.detach()
    assert not logits.allclose(base_logits), "the adapter must change the output"
    model.save_pretrained(root / "adapter")
    (root / "inputs.json").write_text(json.dumps({k: v.tolist() for k, v in inputs.items()}))
    save_file(inputs, str(root / "inputs.safetensors"))
    return SavedAdapter(
        root=root,
        base=str(root / "base"),
        adapter=str(root / "adapter"),
        inputs_file=str(root / "inputs.safetensors"),
        model=model,
        inputs=inputs,
        logits=logits,
    )


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama (`qlora_helpers.CONFIG`) saved as a checkpoint, so that the QLoRA tests can reload it
    quantized (as users load a 7B)."""
    import torch
    from qlora_helpers import CONFIG
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(folder)
    return str(folder)
