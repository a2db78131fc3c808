"""Per-sample gradients of the trainable LoRA tensors equal a one-example-at-a-time loop.

Reference: the model in eval mode, plain autograd, each example alone with its own padding (padded positions
cut off), frozen parameters present. Tolerance: |got - ref| <= 1e-6 + 1e-5 * |ref| (CPU fp32).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from tiny_models import randomize_lora, tiny_bert, tiny_llama, tiny_roberta, tiny_swin, tiny_vit
from torch import nn

import peft_lalora  # noqa: F401  (registers LALORA with peft)
from peft_lalora import ConfigError, LALoraConfig, UnsupportedModelError
from peft_lalora.privacy import grad_sample_hooks
from peft_lalora.privacy.grad_sample import FuncBackend, HooksBackend, select_backend
from peft_lalora.privacy.losses import per_example_loss

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

ATOL, RTOL = 1e-6, 1e-5
BUILDERS = {
    "bert": lambda: tiny_bert(num_labels=3),
    "roberta": lambda: tiny_roberta(num_labels=3),
    "llama": tiny_llama,
    "vit": tiny_vit,
    "swin": tiny_swin,
}  # shared tiny configs, 3 labels


TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "vit": ["q_proj", "v_proj"],
    "swin": ["q_proj", "v_proj"],
}
TASKS = {"bert": "SEQ_CLS", "roberta": "SEQ_CLS", "llama": "CAUSAL_LM"}


@functools.cache
def peft_model(name: str, lora_dropout: float = 0.0):
    torch.manual_seed(0)
    head = None if name in TASKS else ["classifier"]
    config = LALoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=TARGETS[name],
        task_type=TASKS.get(name),
        modules_to_save=head,
        lora_dropout=lora_dropout,
    )
    model = get_peft_model(BUILDERS[name](), config).eval()
    randomize_lora(model, seed=1, scale=0.5)  # non-zero B so that A's gradient is non-zero too
    return model


def make_batch(name: str, batch_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if name in ("vit", "swin"):
        size = 8 if name == "vit" else 16
        return {
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
            "labels": torch.randint(0, 3, (batch_size,), generator=g),
        }
    length = 9
    ids = torch.randint(3, 50, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch_size):  # right padding of 0, 1, 2, 3 tokens
        pad = i % 4
        if pad:
            mask[i, length - pad :] = 0
            ids[i, length - pad :] = 1
    if name == "llama":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, 3, (batch_size,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def set_phase(model, factors) -> dict:
    model.base_model.set_trainable_factors(factors)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def reference(model, batch: dict, params: dict) -> tuple[dict, torch.Tensor]:
    """One example at a time, plain autograd, padded positions cut off (the example with its own mask)."""
    grads, losses = {n: [] for n in params}, []
    for i in range(batch["labels"].shape[0]):
        example = {k: v[i : i + 1] for k, v in batch.items()}
        if "attention_mask" in example:
            keep = int(example["attention_mask"].sum())
            example = {k: (v[:, :keep] if v.dim() == 2 else v) for k, v in example.items()}
        loss = per_example_loss(model(**{k: v for k, v in example.items() if k != "labels"}), example)
        for n, g in zip(params, torch.autograd.grad(loss.sum(), list(params.values()))):
            grads[n].append(g)
        losses.append(loss.detach())
    return {n: torch.stack(v) for n, v in grads.items()}, torch.cat(losses)


def assert_matches_reference(backend, model, batch, params):
    got, losses = backend.compute(batch, params)
    ref, ref_losses = reference(model, batch, params)
    assert set(got) == set(params)
    for name, param in params.items():
        assert got[name].shape == (batch["labels"].shape[0], *param.shape)
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
    assert any(ref[n].abs().max() > 1e-4 for n in params), "reference gradients are all ~0: the test would be vacuous"
    torch.testing.assert_close(losses, ref_losses, atol=ATOL, rtol=RTOL)
    assert not losses.requires_grad
    assert all(p.grad is None for p in model.parameters())


# ----- exactness -----------------------------------------------------------------------------------------------
CASES = [
    ("bert", "hooks"),
    ("roberta", "hooks"),
    ("vit", "hooks"),
    ("llama", "hooks"),
    ("swin", "func"),
    ("vit", "func"),
]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("factors", ["B", "A"])
@pytest.mark.parametrize("name,backend_name", CASES)
def test_per_sample_gradients_equal_one_example_loop(name, backend_name, factors, batch_size):
    model = peft_model(name)
    params = set_phase(model, factors)  # the other factor is frozen but present
    assert any(".lora_" in n for n in params) and not any(
        f".lora_{'A' if factors == 'B' else 'B'}." in n for n in params
    )
    with select_backend(model, backend_name) as backend:
        assert backend.name == backend_name
        assert_matches_reference(backend, model, make_batch(name, batch_size, seed=batch_size), params)


@pytest.mark.parametrize("name,backend_name", [("roberta", "hooks"), ("swin", "func")])
def test_alternating_param_sets_on_one_backend(name, backend_name):
    model = peft_model(name)
    backend = select_backend(model, backend_name)
    try:
        for step, factors in enumerate(["B", "A", "B", {"A", "B"}]):
            params = set_phase(model, factors)
            assert_matches_reference(backend, model, make_batch(name, 3, seed=step), params)
    finally:
        backend.close()
        set_phase(model, "B")


def test_hooks_only_on_modules_owning_trainable_tensors_and_removed_by_close():
    model = peft_model("roberta")
    params = set_phase(model, "B")
    backend = HooksBackend(model)
    backend.compute(make_batch("roberta", 2), params)
    hooked = {n for n, m in model.named_modules() if m._forward_hooks}  # torch lists hooks in private dicts only
    owners = {n.rsplit(".", 1)[0] for n in params}
    assert hooked == owners  # lora_B leaves and the head's two linears; no frozen lora_A, no base layer
    backend.close()
    assert not any(m._forward_hooks for m in model.modules())
    backend.close()  # idempotent


def test_hooks_are_inert_outside_compute():
    model = peft_model("bert")
    params = set_phase(model, "B")
    with HooksBackend(model) as backend:
        backend.compute(make_batch("bert", 3), params)
        model(**{k: v for k, v in make_batch("bert", 5).items() if k != "labels"})  # other batch size: no error
        assert_matches_reference(backend, model, make_batch("bert", 4, seed=7), params)


def test_train_mode_dropout_hooks_sum_to_batch_gradient():
    """With dropout on, per-sample grads of one forward pass sum to the batch gradient under the same masks."""
    model = peft_model("bert", lora_dropout=0.3).train()
    try:
        params = set_phase(model, "A")
        batch = make_batch("bert", 6)
        torch.manual_seed(123)
        grads, _ = HooksBackend(model).compute(batch, params)
        torch.manual_seed(123)
        loss = per_example_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
        total = torch.autograd.grad(loss.sum(), list(params.values()))
        for g, t in zip(grads.values(), total):
            torch.testing.assert_close(g.sum(0), t, atol=1e-6, rtol=1e-5)
    finally:
        model.eval()


def test_func_backend_runs_with_dropout_in_train_mode():
    model = peft_model("vit", lora_dropout=0.5).train()
    try:
        params = set_phase(model, "B")
        grads, losses = FuncBackend(model).compute(make_batch("vit", 4), params)
        assert losses.shape == (4,) and all(torch.isfinite(g).all() for g in grads.values())
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


# ----- backend choice and refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,expected", [("bert", "hooks"), ("roberta", "hooks"), ("vit", "hooks"), ("llama", "hooks"), ("swin", "func")]
)
def test_auto_picks_an_exact_backend(name, expected):
    backend = select_backend(peft_model(name))
    assert backend.name == expected
    backend.close()


def test_hooks_on_swin_refused_up_front_naming_a_module():
    with pytest.raises(
        UnsupportedModelError, match=r"'swin'.*`base_model\.model\.swin\..*q_proj\.lora_A\.default`.*backend='func'"
    ):
        select_backend(peft_model("swin"), "hooks")


def test_hooks_runtime_check_catches_windows_folded_into_the_batch(monkeypatch):
    """Without the model_type guard, the activation check still refuses Swin before any gradient is returned."""
    monkeypatch.setattr(grad_sample_hooks, "is_windowed", lambda model: False)
    model = peft_model("swin")
    params = set_phase(model, "B")
    with HooksBackend(model) as backend:
        with pytest.raises(
            UnsupportedModelError, match=r"module `.*lora_B\.default` received an input of shape .* not the batch of 3"
        ):
            backend.compute(make_batch("swin", 3), params)
    assert all(p.grad is None for p in model.parameters())


def test_unknown_backend_name():
    with pytest.raises(ConfigError, match=r"`backend` must be one of \('auto', 'hooks', 'func'\), got 'opacus'"):
        select_backend(peft_model("bert"), "opacus")


def test_func_on_transformers5_bert_is_refused_not_run():
    """vmap cannot trace transformers-5 BERT/RoBERTa mask code: a clear error pointing at hooks, no wrong numbers."""
    model = peft_model("bert")
    with pytest.raises(
        UnsupportedModelError, match=r"`backend='func'` could not run model_type 'bert'.*backend='hooks'"
    ):
        FuncBackend(model).compute(make_batch("bert", 2), set_phase(model, "B"))


class RawAdapter(nn.Module):
    """A VeRA-style adapter: raw parameters applied with F.linear (no Opacus grad sampler for this type)."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(4, 4).requires_grad_(False)
        self.a = nn.Parameter(torch.randn(2, 4))
        self.b = nn.Parameter(torch.randn(4, 2))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.base(x) + F.linear(F.linear(x, self.a), self.b)
        return self.head(torch.tanh(h))


def test_unsupported_layer_refused_by_hooks_and_handled_exactly_by_func():
    torch.manual_seed(0)
    model = RawAdapter()
    batch = {"x": torch.randn(5, 4), "labels": torch.tensor([0, 1, 2, 0, 1])}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(
        UnsupportedModelError, match=r"module `` \(RawAdapter\) owns a trainable tensor.*backend='func'"
    ):
        HooksBackend(model).compute(batch, params)
    backend = select_backend(model)
    assert backend.name == "func"
    grads, _ = backend.compute(batch, params)
    for i in range(5):
        loss = F.cross_entropy(model(batch["x"][i : i + 1]), batch["labels"][i : i + 1])
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            torch.testing.assert_close(grads[name][i], g, atol=ATOL, rtol=RTOL)


def test_batch_norm_model_refused_by_every_backend():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    for backend in ("auto", "hooks", "func"):
        with pytest.raises(UnsupportedModelError, match=r"module `1` \(BatchNorm1d\) normalises over the batch"):
            select_backend(model, backend)


# ----- argument checks -----------------------------------------------------------------------------------------
def test_params_must_be_exactly_the_trainable_tensors():
    model = peft_model("bert")
    params = set_phase(model, "B")
    batch = make_batch("bert", 2)
    with HooksBackend(model) as backend:
        missing = dict(list(params.items())[1:])
        with pytest.raises(ConfigError, match=r"`params` must hold every trainable parameter.*set_trainable_factors"):
            backend.compute(batch, missing)
        frozen_name = next(n for n, p in model.named_parameters() if ".lora_A." in n)
        with pytest.raises(ConfigError, match=r"`params` entry .*lora_A.* has requires_grad=False"):
            backend.compute(batch, {**params, frozen_name: dict(model.named_parameters())[frozen_name]})
        with pytest.raises(ConfigError, match=r"`params` key 'weight' is not the name"):
            backend.compute(batch, {"weight": next(iter(params.values()))})
        with pytest.raises(ConfigError, match=r"`params` must be a non-empty dict"):
            backend.compute(batch, {})


def test_batch_checks_and_empty_batch():
    model = peft_model("vit")
    params = set_phase(model, "B")
    with HooksBackend(model) as backend:
        with pytest.raises(ConfigError, match=r"`batch` must be a dict of tensors with the targets under 'labels'"):
            backend.compute({"pixel_values": torch.randn(2, 3, 8, 8)}, params)
        with pytest.raises(
            ConfigError, match=r"`batch\['pixel_values'\]` must have the batch size 3 .* got shape \(2, 3, 8, 8\)"
        ):
            backend.compute(
                {"pixel_values": torch.randn(2, 3, 8, 8), "labels": torch.zeros(3, dtype=torch.long)}, params
            )
        grads, losses = backend.compute(
            {"pixel_values": torch.randn(0, 3, 8, 8), "labels": torch.zeros(0, dtype=torch.long)}, params
        )
    assert losses.shape == (0,)
    assert all(grads[n].shape == (0, *p.shape) for n, p in params.items())


# ----- per_example_loss ----------------------------------------------------------------------------------------
def test_per_example_loss_classification_and_regression():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    labels = torch.tensor([0, 2])
    expected = torch.stack([-torch.log_softmax(logits[0], 0)[0], torch.log(torch.tensor(3.0))])
    torch.testing.assert_close(per_example_loss({"logits": logits}, {"labels": labels}), expected)
    reg = per_example_loss(torch.tensor([[1.5], [-2.0]]), {"labels": torch.tensor([1.0, 1.0])})
    torch.testing.assert_close(reg, torch.tensor([0.25, 9.0]))


def test_per_example_loss_causal_lm_shifts_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[3, 1, 4, -100], [-100, -100, -100, -100]])
    got = per_example_loss({"logits": logits}, {"labels": labels})
    # example 0: positions 0, 1 predict tokens 1, 4 (position 2 predicts the ignored token)
    logp = torch.log_softmax(logits[0], -1)
    torch.testing.assert_close(got[0], -(logp[0, 1] + logp[1, 4]) / 2)
    assert got[1] == 0.0  # nothing counted: zero loss, no NaN


def test_per_example_loss_errors():
    with pytest.raises(
        ConfigError, match=r"`batch` must hold the targets under the key 'labels', got keys \['input_ids'\]"
    ):
        per_example_loss({"logits": torch.zeros(2, 3)}, {"input_ids": torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"`outputs.logits` of shape \(2, 3, 4, 5\)"):
        per_example_loss({"logits": torch.zeros(2, 3, 4, 5)}, {"labels": torch.zeros(2, dtype=torch.long)})


def test_func_backend_retries_with_math_attention_when_fused_kernels_refuse_vmap(monkeypatch):
    # On CUDA the fused SDPA kernels refused Swin's batched bias under vmap ("attn_bias: wrong shape"); the backend
    # then switches to the math kernel. Simulated here: attention raises that error until the switch.
    from tiny_models import image_inputs

    from peft_lalora.privacy.grad_sample_func import FuncBackend

    model = get_peft_model(tiny_swin(), LALoraConfig(r=2, target_modules=["q_proj", "v_proj"], alternation="none"))
    backend = FuncBackend(model)
    original, calls = F.scaled_dot_product_attention, []

    def fused_refuses(*args, **kwargs):
        calls.append(backend._math_attention)  # private: the fallback switch has no public view
        if not backend._math_attention:
            raise RuntimeError("attn_bias: wrong shape (batch dimension)")
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", fused_refuses)
    batch = {**image_inputs(16), "labels": torch.tensor([0, 1, 2])}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads, _ = backend.compute(batch, params)
    assert calls[0] is False and calls[-1] is True  # refused once, then retried with the math kernel
    assert all(g.shape[0] == 3 and torch.isfinite(g).all() for g in grads.values())
    with pytest.raises(UnsupportedModelError, match="attn_bias"):  # a refusal under the math kernel is final
        monkeypatch.setattr(
            F,
            "scaled_dot_product_attention",
            lambda *a, **k: (_ for _ in ()).throw(RuntimeError("attn_bias: still wrong")),
        )
        backend.compute(batch, params)
