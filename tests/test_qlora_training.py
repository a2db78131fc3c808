"""QLoRA end to end: every method trains under DP on a 4-bit base, the adapter loads in a fresh process onto the
quantized and the full-precision base, and the recipes' quantization flags (fed_llm.py, the Flower task).
Helpers and tolerances: tests/qlora_helpers.py (|got - ref| <= 1e-6 + 1e-5 |ref|, CPU fp32 compute).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from fed_helpers import adapter_state, toy_args

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install '.[qlora]')")

from peft import get_peft_model  # noqa: E402
from qlora_helpers import (  # noqa: E402
    ROOT,
    assert_exact,
    collate,
    dataset,
    quantized,
)
from transformers import BitsAndBytesConfig  # noqa: E402

import peft_lalora  # noqa: E402, F401
from peft_lalora import FederatedDPTrainer, LALoraConfig, UnsupportedModelError  # noqa: E402
from peft_lalora.privacy.grad_sample import select_backend  # noqa: E402
from peft_lalora.privacy.losses import per_example_loss  # noqa: E402

LOAD = """
import json, sys, torch
import peft_lalora
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
base, folder, quant = sys.argv[1], sys.argv[2], sys.argv[3] == "4bit"
kw = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")} if quant else {}
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kw), folder).eval()
for m in model.modules():  # bitsandbytes' CPU inference kernel computes in bf16: compare in fp32, as trained
    if hasattr(m, "support_avx512bf16_for_cpu"):
        m.support_avx512bf16_for_cpu = False
ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
with torch.no_grad():
    logits = model(input_ids=ids).logits[0]
lora = {n: p.tolist() for n, p in model.named_parameters() if "lora_" in n}
print(json.dumps({"logits": logits.tolist(), "lora": lora, "layer": type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__}))
"""


@pytest.mark.parametrize("method", ["lalora", "lalora_nofilter", "rolora", "ffa", "dplora"])
def test_every_method_trains_under_dp_on_a_4bit_base_and_keeps_the_base_frozen(tmp_path, base_dir, method):
    # Prepare: 2 clients, 2 rounds, DP on, the method's own schedule (and LA-LoRA's filter); the quantized weights
    model = quantized(base_dir, "nf4", method=method, kbit=True, randomize=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    before = adapter_state(model)
    args = toy_args(tmp_path, num_clients=2, clients_per_round=2, num_rounds=2, per_device_train_batch_size=4)
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        FederatedDPTrainer(model=model, args=args, train_dataset=dataset(), data_collator=collate).train()
    after = adapter_state(model)
    # Assert: the adapter moved, stays finite, and the 4-bit base (and every frozen tensor) is bit-identical
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    if method == "ffa":  # FFA-LoRA never trains A
        assert all(torch.equal(before[n], after[n]) for n in before if ".lora_A." in n)


@pytest.mark.processes
def test_a_4bit_run_trains_and_its_adapter_loads_on_the_quantized_and_the_full_base(tmp_path, base_dir):
    # Prepare: LA-LoRA (with its filter), 2 clients, 2 rounds, DP on
    model = quantized(base_dir, "nf4", method="lalora", kbit=True, randomize=False)
    before = adapter_state(model)
    args = toy_args(tmp_path / "run", num_clients=2, clients_per_round=2, num_rounds=2, per_device_train_batch_size=4)
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        FederatedDPTrainer(model=model, args=args, train_dataset=dataset(), data_collator=collate).train()
    after = adapter_state(model)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]])).logits[0]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    loaded = {}
    for kind in ("4bit", "full"):
        proc = subprocess.run(
            [sys.executable, "-c", LOAD, base_dir, str(folder), kind],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        loaded[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    # Assert: the adapter trained (and is finite); it loads onto both bases with the same LoRA tensors; on the same
    # 4-bit base it reproduces the trained model's logits; on the full-precision base the logits differ by the
    # quantization error of the base weights only (same adapter), which is what "loads onto the unquantized base" means
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert loaded["4bit"]["layer"] == "Linear4bit" and loaded["full"]["layer"] == "Linear"
    assert loaded["4bit"]["lora"] == loaded["full"]["lora"]
    torch.testing.assert_close(torch.tensor(loaded["4bit"]["logits"]), expected, atol=1e-5, rtol=1e-5)
    full = torch.tensor(loaded["full"]["logits"])
    assert 0 < float((full - expected).abs().max()) < 0.5 * float(expected.abs().max())


# ----- the recipe ----------------------------------------------------------------------------------------------
def _fed_llm():
    import importlib.util

    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    spec = importlib.util.spec_from_file_location("fed_llm_qlora", os.path.join(ROOT, "recipes", "fed_llm.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_fed_llm_trains_on_a_quantized_offline_base(tmp_path, flag):
    # Prepare: the offline default, small, with its base reloaded in 4 / 8 bits
    out_dir = tmp_path / "out"
    flags = ["--max_train_samples", "160", "--max_eval_samples", "8", "--eval_generate", "2", "--max_seq_length", "48"]
    flags += ["--num_rounds", "1", "--local_steps", "1", "--num_clients", "2", "--clients_per_round", "2"]
    flags += ["--per_device_train_batch_size", "4", "--eval_rounds", "0", "--target_epsilon", "8"]
    flags += ["--output_dir", str(out_dir), "--noise_seed", "0", "--client_split", "iid", flag]
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fed_llm().main(flags)
    # Assert: a DP adapter and report; the base was quantized (peft's k-bit LoRA layers were trained)
    report = json.loads((out_dir / "privacy_report.json").read_text())
    assert 0 < report["epsilon"] <= 8.0 + 1e-6
    assert (out_dir / "adapter_model.safetensors").exists()


def test_fed_llm_refuses_both_quantization_flags():
    with pytest.raises(ValueError, match="`load_in_4bit` and `load_in_8bit` are both True"):
        _fed_llm().main(["--load_in_4bit", "--load_in_8bit", "--output_dir", "unused"])


def test_the_flower_task_builds_a_4bit_encoder_with_exact_per_sample_gradients():
    # Prepare: the Flower app's model (MiniLM encoder, mean pooling, LA-LoRA on query/value, trained classifier) in 4 bits
    sys.path.insert(0, os.path.join(ROOT, "recipes", "flower_app"))
    from lalora_rt.task import build_model, model_path, quantization
    from transformers import AutoTokenizer

    model = build_model({"load-in-4bit": True, "num-hidden-layers": 2, "method": "dplora"}, {}).eval()  # no dropout
    query = model.get_base_model().bert.encoder.layer[0].attention.self.query
    assert type(query).__module__ == "peft.tuners.lora.bnb" and type(query.base_layer).__name__ == "Linear4bit"
    tokenizer = AutoTokenizer.from_pretrained(model_path({}, {}))
    texts = ["a fine film", "dull and far too long, with nothing to say", "fresh"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"), labels=torch.tensor([1, 0, 1]))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # Execute
    with select_backend(model) as backend:
        got, _ = backend.compute(batch, params)
    # Assert: each example alone (unpadded), plain autograd
    ref = {n: [] for n in params}
    for text, label in zip(texts, [1, 0, 1]):
        one = dict(tokenizer([text], return_tensors="pt"), labels=torch.tensor([label]))
        loss = per_example_loss(model(**{k: v for k, v in one.items() if k != "labels"}), one)
        for n, g in zip(params, torch.autograd.grad(loss.sum(), list(params.values()))):
            ref[n].append(g)
    assert_exact(got, {n: torch.stack(v) for n, v in ref.items()})
    with pytest.raises(ValueError, match="`load-in-4bit` and `load-in-8bit` are both true"):
        quantization({"load-in-4bit": True, "load-in-8bit": True})


def test_a_quantized_layer_that_should_train_is_refused_naming_it_and_the_fix():
    # a sequence-classification head is quantized too unless skipped; as modules_to_save it would train in 4 bits
    sys.path.insert(0, os.path.join(ROOT, "recipes", "flower_app"))
    from lalora_rt.task import model_path
    from transformers import AutoModelForSequenceClassification

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    base = AutoModelForSequenceClassification.from_pretrained(
        model_path({}, {}), num_labels=2, num_hidden_layers=1, quantization_config=quant
    )
    config = LALoraConfig.for_method(
        "dplora", r=2, target_modules=["query"], modules_to_save=["classifier"], task_type="SEQ_CLS"
    )
    with pytest.raises(
        UnsupportedModelError, match=r"`.*classifier\.modules_to_save\.default`.*llm_int8_skip_modules"
    ):
        select_backend(get_peft_model(base, config))
