"""DP on bases quantized by bitsandbytes (QLoRA): peft's own k-bit LoRA layers (`get_peft_model` on a model loaded
with `BitsAndBytesConfig`, with and without `prepare_model_for_kbit_training`), on bitsandbytes' CPU backend.

References are independent of the code under test: the same quantized model run on each example alone (no padding,
plain autograd); the update bound is C / B from the definition of the clipped mean. Tolerance as for fp32 layers
(RELIABILITY R1): |got - ref| <= 1e-6 + 1e-5 * |ref|; the quantized base computes in fp32 (`bnb_4bit_compute_dtype`
default), so the per-example loop and the batch see the same dequantized weights. Helpers: tests/qlora_helpers.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from fed_helpers import adapter_state, toy_args

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install '.[qlora]')")

from peft import get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from qlora_helpers import (  # noqa: E402
    MODES,
    assert_exact,
    collate,
    dataset,
    quantized,
    reference,
    rows,
)
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

import peft_lalora  # noqa: E402, F401
from peft_lalora import FederatedDPTrainer, LALoraConfig, UnsupportedModelError  # noqa: E402
from peft_lalora.federated.client_update import make_stepper  # noqa: E402
from peft_lalora.privacy.grad_sample import select_backend  # noqa: E402


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
