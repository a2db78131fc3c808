"""DP on bases quantized by bitsandbytes (QLoRA): peft's own k-bit LoRA layers (`get_peft_model` on a model loaded
with `BitsAndBytesConfig`, with and without `prepare_model_for_kbit_training`), on bitsandbytes' CPU backend.

References are independent of the code under test: the same quantized model run on each example alone (no padding,
plain autograd); the update bound is C / B from the definition of the clipped mean. Tolerance as for fp32 layers
(RELIABILITY R1): |got - ref| <= 1e-6 + 1e-5 * |ref|; the quantized base computes in fp32 (`bnb_4bit_compute_dtype`
default), so the per-example loop and the batch see the same dequantized weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from datasets import Dataset
from fed_helpers import adapter_state, toy_args

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install '.[qlora]')")

from peft import get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import peft_lalora  # noqa: E402, F401
from peft_lalora import FederatedDPTrainer, LALoraConfig, UnsupportedModelError  # noqa: E402
from peft_lalora.federated.client_update import make_stepper  # noqa: E402
from peft_lalora.privacy.grad_sample import select_backend  # noqa: E402
from peft_lalora.privacy.losses import per_example_loss  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL, RTOL = 1e-6, 1e-5
VOCAB = 64
# bitsandbytes' 4-bit blocks are 64 wide: every quantized dimension is a multiple of 64
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)
MODES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True, llm_int8_threshold=0.0),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama saved as a checkpoint, so that it can be reloaded quantized (as users load a 7B)."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(folder)
    return str(folder)


def quantized(base_dir: str, mode: str = "nf4", method: str = "dplora", kbit: bool = False, randomize: bool = True):
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**MODES[mode]))
    if kbit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LALoraConfig.for_method(
        method, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    if randomize:  # non-zero B so that A's gradient is non-zero too
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return peft_model


def rows(n: int = 5, seed: int = 0) -> list[dict]:
    """Instruction-like examples of several lengths: prompts masked with -100, responses counted."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, VOCAB, (2 + i % 4,), generator=g).tolist()
        response = torch.randint(3, VOCAB, (1 + (i * 3) % 4,), generator=g).tolist() + [2]
        out.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return out


def collate(examples: list[dict]) -> dict:
    """Right padding with id 0, labels -100 on the padding, positions from 0 per example."""
    length = max(len(r["input_ids"]) for r in examples)
    ids, labels, mask = [], [], []
    for r in examples:
        pad = length - len(r["input_ids"])
        ids.append(r["input_ids"] + [0] * pad)
        labels.append(r["labels"] + [-100] * pad)
        mask.append([1] * len(r["input_ids"]) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def reference(model, examples: list[dict], params: dict) -> dict:
    """Each example alone through the same quantized model, unpadded, in the model's current mode; plain autograd.
    (In eval mode, bitsandbytes' CPU backend switches 4-bit layers to a kernel without a backward: the tests run
    the reference in training mode, as the DP step does; these configs have no dropout.)"""
    grads = {n: [] for n in params}
    for r in examples:
        loss = per_example_loss(
            model(input_ids=torch.tensor([r["input_ids"]])), {"labels": torch.tensor([r["labels"]])}
        )
        for n, g in zip(params, torch.autograd.grad(loss.sum(), list(params.values()))):
            grads[n].append(g)
    return {n: torch.stack(v) for n, v in grads.items()}


def assert_exact(got: dict, ref: dict) -> None:
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=ATOL, rtol=RTOL, msg=lambda m, n=n: f"{n}: {m}")
    assert max(float(r.abs().max()) for r in ref.values()) > 1e-3  # not trivially zero


# ----- exact per-sample gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("kbit", [False, True], ids=["plain", "prepare_model_for_kbit_training"])
@pytest.mark.parametrize("mode", list(MODES))
def test_per_sample_gradients_on_a_quantized_base_equal_a_per_example_loop(base_dir, mode, kbit):
    # Prepare: peft's k-bit LoRA layers on the quantized projections
    model = quantized(base_dir, mode, kbit=kbit).train()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer.base_layer).__module__.startswith(
        "bitsandbytes."
    )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    examples = rows()
    # Execute
    with select_backend(model) as backend:  # "auto"
        got, _ = backend.compute(collate(examples), params)
        assert backend.name == "hooks"
    # Assert
    assert_exact(got, reference(model, examples, params))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_per_sample_gradients_on_nf4_are_exact_for_batch_sizes_1_3_16(base_dir, batch_size):
    # R1's batch sizes, LA-LoRA's B phase (A frozen but present) and padded sequences
    model = quantized(base_dir, "nf4", method="lalora").train()
    model.base_model.set_trainable_factors({"B"})
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(".lora_B." in n for n in params)
    examples = rows(batch_size, seed=batch_size)
    with select_backend(model) as backend:
        got, _ = backend.compute(collate(examples), params)
    assert_exact(got, reference(model, examples, params))


def test_exact_after_an_evaluation_pass_that_bitsandbytes_uses_to_repack_its_cpu_weights(base_dir):
    # Prepare: an eval forward without gradients (what the pre-flight, an evaluation or generate() do): on a CPU
    # with AVX512-BF16, bitsandbytes repacks the 4-bit weights for a kernel with no backward
    model = quantized(base_dir, "nf4").eval()
    with torch.no_grad():
        model(**{k: v for k, v in collate(rows()).items() if k != "labels"})
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    # Execute
    with select_backend(model) as backend:
        got, _ = backend.compute(collate(rows()), params)
    # Assert: unpacked for training (where it had been packed), exact, and no layer keeps the inference path
    layers = [
        m for m in model.modules() if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsa")
    ]
    assert layers and all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert_exact(got, reference(model, rows(), params))


def test_non_reentrant_gradient_checkpointing_on_a_4bit_base_is_exact(base_dir):
    model = quantized(base_dir, "nf4")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.train()  # transformers only checkpoints in training mode (no dropout in this config)
    ref = reference(model, rows(), params)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.get_base_model().enable_input_require_grads()  # what prepare_model_for_kbit_training does with it
    with select_backend(model, "hooks") as backend:
        got, _ = backend.compute(collate(rows()), params)
    assert_exact(got, ref)


def test_prepare_model_for_kbit_training_with_checkpointing_non_reentrant_exact_default_refused(base_dir):
    # peft's documented call enables checkpointing; its default (torch's reentrant variant) would give zero
    # per-sample gradients inside the checkpointed layers, so it is refused with the fix; non-reentrant is exact
    reference_model = quantized(base_dir, "nf4").train()
    params = {n: p for n, p in reference_model.named_parameters() if p.requires_grad}
    ref = reference(reference_model, rows(), params)
    for kwargs, exact in (({"use_reentrant": False}, True), (None, False)):
        model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**MODES["nf4"]))
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=kwargs)
        config = LALoraConfig.for_method(
            "dplora", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, config)
        quantized_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():  # the same LoRA values as the reference model
            for n, p in quantized_params.items():
                p.copy_(params[n])
        model.train()
        if exact:
            with select_backend(model) as backend:
                got, _ = backend.compute(collate(rows()), quantized_params)
            assert_exact(got, ref)
        else:
            with pytest.raises(
                UnsupportedModelError, match=r"reentrant gradient checkpointing.*'use_reentrant': False"
            ):
                select_backend(model).compute(collate(rows()), quantized_params)


# ----- refusals: the model's fault, named, before training --------------------------------------------------------
def test_8bit_outlier_decomposition_is_refused_under_dp_naming_the_module_and_the_fix(base_dir):
    # llm_int8_threshold > 0 picks outlier columns from the whole batch: examples are no longer independent
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    model = get_peft_model(
        model, LALoraConfig.for_method("dplora", r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    with pytest.raises(UnsupportedModelError, match=r"module `.*layers\.0\.self_attn\.q_proj.*`llm_int8_threshold`=6"):
        select_backend(model)


class PackedInt4Linear(torch.nn.Module):
    """A stand-in for a quantized layer type the library does not know (GPTQ/AWQ-style integer weight buffer)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.zeros(linear.out_features, linear.in_features // 8, dtype=torch.int32))
        self.dense = linear.weight.detach().clone()

    def forward(self, x):
        return x @ self.dense.T


def test_an_unknown_quantized_layer_is_refused_before_training_naming_the_module(tmp_path, base_dir):
    model = LlamaForCausalLM.from_pretrained(base_dir)
    attn = model.model.layers[1].self_attn
    attn.o_proj = PackedInt4Linear(attn.o_proj)
    model = get_peft_model(
        model, LALoraConfig.for_method("dplora", r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    with pytest.raises(UnsupportedModelError, match=r"module `.*layers\.1\.self_attn\.o_proj` \(.*PackedInt4Linear\)"):
        select_backend(model)
    args = toy_args(tmp_path, num_clients=2, clients_per_round=2, num_rounds=1, per_device_train_batch_size=4)
    trainer = FederatedDPTrainer(model=model, args=args, train_dataset=dataset(), data_collator=collate)
    with pytest.raises(UnsupportedModelError, match="PackedInt4Linear"):
        trainer.train()
    assert not (tmp_path / "privacy_report.json").exists()


class NoBackward(torch.autograd.Function):
    """An inference-only kernel: a forward with a backward that returns no gradient (as bitsandbytes' CPU gemv)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def test_a_layer_without_backward_above_an_adapter_is_named_not_blamed_on_the_data(tmp_path, base_dir):
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir),
        LALoraConfig.for_method("dplora", r=2, target_modules=["v_proj"], task_type="CAUSAL_LM"),
    )
    for layer in model.get_base_model().model.layers:
        layer.self_attn.o_proj.register_forward_hook(lambda m, i, out: NoBackward.apply(out))
    args = toy_args(tmp_path, num_clients=2, clients_per_round=2, num_rounds=1, per_device_train_batch_size=4)
    trainer = FederatedDPTrainer(model=model, args=args, train_dataset=dataset(), data_collator=collate)
    with pytest.raises(
        UnsupportedModelError, match=r"whatever the data.*module `.*v_proj\.lora_B\.default` received no"
    ):
        trainer.train()


# ----- DP through the public trainer ------------------------------------------------------------------------------
def dataset(n: int = 40) -> Dataset:
    examples = rows(n, seed=3)
    return Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in examples], "labels": [r["labels"] for r in examples]}
    )


def test_the_non_private_step_moves_the_adapter_after_an_evaluation_pass(base_dir):
    # an eval pass switches bitsandbytes' CPU backend to a kernel without a backward: plain autograd then gets no
    # LoRA gradient at all and the non-private step silently leaves the adapter where it was (unless the stepper
    # prepares the quantized layers first)
    model = quantized(base_dir, "nf4", method="dplora").eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    step = make_stepper(model, dp=False)
    step.reset(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5))
    before = adapter_state(model)
    step(collate(rows()), expected_batch_size=5)
    after = adapter_state(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)  # every A and B tensor moved


@pytest.mark.parametrize("method", ["lalora_nofilter", "dplora"])
def test_one_example_moves_the_4bit_update_by_at_most_c_over_b(tmp_path, base_dir, method):
    # Prepare: one client holding 3 examples plus a 4th (absent: no counted token, or present), q = 1, one step,
    # no noise, SGD lr 1, C below every per-example gradient norm
    clip, batch = 1e-3, 4
    base = rows(3, seed=5)
    absent = {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}
    present = {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, -100, 8, 9, 10]}

    def update(name, fourth):
        model = quantized(base_dir, "nf4", method=method)
        before = adapter_state(model)
        args = toy_args(
            tmp_path / name,
            num_clients=1,
            clients_per_round=1,
            num_rounds=1,
            local_steps=1,
            per_device_train_batch_size=batch,
            learning_rate=1.0,
            noise_multiplier=0.0,
            per_sample_max_grad_norm=clip,
            save_strategy="no",
        )
        examples = base + [fourth]
        data = Dataset.from_dict({k: [r[k] for r in examples] for k in ("input_ids", "labels")})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            FederatedDPTrainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
        after = adapter_state(model)
        return {n: after[n] - before[n] for n in before}

    # Execute
    a, b = update("absent", absent), update("present", present)
    # Assert: adding one example moves the update by exactly C / B once clipped (rel 1e-3), never more
    moved = float(torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in a)))
    assert moved <= clip / batch * (1 + 1e-4) and moved == pytest.approx(clip / batch, rel=1e-3)


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
