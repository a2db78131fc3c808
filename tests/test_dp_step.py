"""The DP-SGD step: frozen stays frozen, per-sample sensitivity, noise calibration,
DP-off equivalence, non-finite samples, empty Poisson batches."""

import copy
import warnings

import pytest
import torch
from peft import get_peft_model
from tiny_models import image_inputs, randomize_lora, text_inputs, tiny_roberta, tiny_vit

import peft_lalora  # noqa: F401
from peft_lalora import ConfigError, LALoraConfig, LALoraWarning
from peft_lalora.privacy import GradientPrivatizer, NonPrivateStep, PrivateStep, active_parameters
from peft_lalora.privacy.secure_random import SecureRandom

C = 0.7


def roberta_model(alternation="local", seed=0):
    model = get_peft_model(
        tiny_roberta(seed),
        LALoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", alternation=alternation
        ),
    )
    randomize_lora(model, seed=seed + 1, scale=0.3)
    return model.eval()


def text_batch(batch=6, seed=0):
    inputs = text_inputs(batch=batch, length=9, seed=seed)
    inputs["labels"] = torch.arange(batch) % 2
    return inputs


def dp_optimizer(params, sigma=0.0, clip=C, kernel=None, seed=0, factor_of=None):
    opt = torch.optim.SGD(list(params), lr=0.1)
    return GradientPrivatizer(
        opt,
        noise_multiplier=sigma,
        per_sample_max_grad_norm=clip,
        lowpass_kernel=kernel,
        factor_of=factor_of,
        generator=SecureRandom(seed, "noise"),
    )


# ----- frozen stays frozen -----------------------------------------------------------------------------------
def test_inactive_factor_and_base_bit_identical_through_dp_steps_and_switches():
    # Prepare: AdamW with weight decay, the optimizer most likely to move a tensor it should not
    model = roberta_model()
    tuner = model.base_model
    trainable = [p for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n]
    step = PrivateStep(
        model,
        torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1),
        noise_multiplier=1.0,
        per_sample_max_grad_norm=C,
        lowpass_kernel=(1, 4, 6, 4, 1),
        generator=SecureRandom(0, "noise"),
    )
    base_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n
    }
    for local_step in range(6):
        factors = tuner.trainable_factors(0, local_step)
        tuner.set_trainable_factors(factors)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        # Execute
        grads, _ = step.backend.compute(text_batch(), active_parameters(model))
        step(text_batch(seed=local_step), expected_batch_size=6)
        # Assert: only active tensors got per-sample gradients, and only they moved
        assert all(
            ("lora_A" in n and "A" in factors) or ("lora_B" in n and "B" in factors) or "modules_to_save" in n
            for n in grads
        )
        for name, param in model.named_parameters():
            moved = not torch.equal(param.detach(), before[name])
            active = (
                ("lora_A" in name and "A" in factors)
                or ("lora_B" in name and "B" in factors)
                or ("modules_to_save" in name and param.requires_grad)
            )
            assert moved == active, (local_step, name)
            assert param.grad is None
    for name, value in base_before.items():
        assert torch.equal(dict(model.named_parameters())[name].detach(), value), name


# ----- per-sample sensitivity --------------------------------------------------------------------------------
def _summed_clipped(opt, grad_samples):
    """The production path: per-example factors, then the weighted sum."""
    return opt.sum_clipped(grad_samples, opt.clip_factors(grad_samples))


def _diff_norm(a, b):
    return float(torch.sqrt(sum(((a[n] - b[n]).double() ** 2).sum() for n in a)))


def _batch_clipped(grad_samples, clip):
    """The WRONG mechanism: clip the summed batch gradient instead of each example's."""
    summed = {n: g.sum(0) for n, g in grad_samples.items()}
    norm = float(torch.sqrt(sum((s.double() ** 2).sum() for s in summed.values())))
    return {n: s * min(1.0, clip / (norm + 1e-6)) for n, s in summed.items()}


def test_huge_sample_moves_the_sum_by_exactly_c():
    g = torch.Generator().manual_seed(0)
    samples = {"a": torch.randn(5, 4, 8, generator=g) * 0.01, "b": torch.randn(5, 8, 4, generator=g) * 0.01}
    huge = {"a": torch.randn(1, 4, 8, generator=g) * 1e6, "b": torch.randn(1, 8, 4, generator=g) * 1e6}
    with_huge = {n: torch.cat([samples[n], huge[n]]) for n in samples}
    opt = dp_optimizer([torch.nn.Parameter(torch.zeros(1))])
    diff = _diff_norm(_summed_clipped(opt, with_huge), _summed_clipped(opt, samples))
    assert diff == pytest.approx(C, rel=1e-6)


def _adversarial_pairs(count=600, seed=0):
    """Neighbouring per-sample gradient sets: D and D minus one example, with adversarial shapes and scales."""
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        batch = 1 + i % 9
        scale = [1e-6, 1e-2, 1.0, 10.0, 1e8][i % 5]
        grads = {"A": torch.randn(batch, 3, 16, generator=g), "B": torch.randn(batch, 16, 3, generator=g)}
        if i % 3 == 0:  # all examples aligned: the case where batch clipping is most wrong
            grads = {n: v[:1].expand_as(v).clone() for n, v in grads.items()}
        grads = {n: v * scale * torch.rand(batch, 1, 1, generator=g) for n, v in grads.items()}
        yield grads, {n: v[:-1] for n, v in grads.items()}


def test_adversarial_neighbours_never_differ_by_more_than_c():
    opt = dp_optimizer([torch.nn.Parameter(torch.zeros(1))])
    worst = 0.0
    for big, small in _adversarial_pairs():
        if small["A"].shape[0] == 0:
            small_sum = {n: torch.zeros_like(v[0]) for n, v in big.items()}
        else:
            small_sum = _summed_clipped(opt, small)
        worst = max(worst, _diff_norm(_summed_clipped(opt, big), small_sum))
    assert worst <= C * (1 + 1e-6)
    assert worst >= 0.99 * C  # the bound is reached, the pairs are adversarial enough


def test_batch_level_clipping_fails_the_same_check():
    worst = 0.0
    for big, small in _adversarial_pairs():
        if small["A"].shape[0] == 0:
            continue
        worst = max(worst, _diff_norm(_batch_clipped(big, C), _batch_clipped(small, C)))
    assert worst > C * (1 + 1e-6), "batch clipping must be caught by the sensitivity check"
    # and the textbook worst case: removing y = -3x flips the clipped batch gradient, a change of 2C
    x = {"A": torch.ones(1, 2, 2), "B": torch.ones(1, 2, 2)}
    pair = {n: torch.cat([v, -3 * v]) for n, v in x.items()}
    assert _diff_norm(_batch_clipped(pair, C), _batch_clipped(x, C)) == pytest.approx(2 * C, rel=1e-5)
    opt = dp_optimizer([torch.nn.Parameter(torch.zeros(1))])
    assert _diff_norm(_summed_clipped(opt, pair), _summed_clipped(opt, x)) <= C * (1 + 1e-6)


def test_real_model_neighbours_differ_by_exactly_c_when_all_clip():
    model = roberta_model()
    step = PrivateStep(
        model,
        torch.optim.SGD(active_parameters(model).values(), lr=0.1),
        noise_multiplier=0.0,
        per_sample_max_grad_norm=1e-4,
    )
    params = active_parameters(model)
    big = text_batch(6)
    small = {k: v[:-1] for k, v in big.items()}
    g_big = step.dp.privatize(*step.backend.compute(big, params)[:1], params, expected_batch_size=1)
    g_small = step.dp.privatize(*step.backend.compute(small, params)[:1], params, expected_batch_size=1)
    assert _diff_norm(g_big, g_small) == pytest.approx(1e-4, rel=1e-3)  # the last example's norm >> C


# ----- noise calibration -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_noise_std_is_sigma_c_over_b(seed):
    sigma, batch = 1.3, 16
    param = torch.nn.Parameter(torch.zeros(400, 256))  # 102,400 coordinates
    opt = dp_optimizer([param], sigma=sigma, seed=seed)
    zero = {"w": torch.zeros(batch, 400, 256)}
    noise = opt.privatize(zero, {"w": param}, expected_batch_size=batch)["w"]
    assert abs(float(noise.std()) / (sigma * C / batch) - 1) < 0.01
    assert abs(float(noise.mean())) < 5 * sigma * C / batch / 320  # 5 standard errors


def test_noise_independent_across_steps():
    param = torch.nn.Parameter(torch.zeros(100_000))
    opt = dp_optimizer([param], sigma=1.0, seed=3)
    zero = {"w": torch.zeros(4, 100_000)}
    first = opt.privatize(zero, {"w": param}, 4)["w"]
    second = opt.privatize(zero, {"w": param}, 4)["w"]
    corr = float(torch.corrcoef(torch.stack([first, second]))[0, 1])
    assert abs(corr) < 0.015  # 4.7 standard errors at n = 1e5


def test_lowpass_stage_filters_the_noise_of_the_active_factor_only():
    a = torch.nn.Parameter(torch.zeros(4, 2000))
    head = torch.nn.Parameter(torch.zeros(4, 2000))
    opt = dp_optimizer([a, head], sigma=1.0, kernel=(1, 4, 6, 4, 1), factor_of={"A": "A"})
    out = opt.privatize({"A": torch.zeros(2, 4, 2000), "h": torch.zeros(2, 4, 2000)}, {"A": a, "h": head}, 1)
    expected_ratio = (70 / 256) ** 0.5  # sqrt(sum k^2) for the normalised kernel
    assert abs(float(out["A"].std()) / (C * expected_ratio) - 1) < 0.03
    assert abs(float(out["h"].std()) / C - 1) < 0.03


# ----- DP off equals the non-private step --------------------------------------------------------------------
def test_no_noise_huge_clip_equals_non_private_update():
    private_model = roberta_model(alternation="none")
    plain_model = copy.deepcopy(private_model)
    batch = text_batch(6)
    private = PrivateStep(
        private_model,
        torch.optim.SGD(active_parameters(private_model).values(), lr=0.5),
        noise_multiplier=0.0,
        per_sample_max_grad_norm=1e9,
    )
    plain = NonPrivateStep(plain_model, torch.optim.SGD(active_parameters(plain_model).values(), lr=0.5))
    private(batch, expected_batch_size=6)
    plain(batch, expected_batch_size=6)
    after_plain = dict(plain_model.named_parameters())
    changed = 0
    for name, param in private_model.named_parameters():
        torch.testing.assert_close(param.detach(), after_plain[name].detach(), rtol=0, atol=1e-7)
        changed += int("lora_B" in name and not torch.equal(param, roberta_model().state_dict().get(name, param)))
    assert changed > 0


# ----- non-finite samples and empty batches --------------------------------------------------------------------
def vit_model():
    model = get_peft_model(
        tiny_vit(),
        LALoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], alternation="none"),
    )
    randomize_lora(model, scale=0.3)
    return model.eval()


def test_nan_sample_is_dropped_and_equals_the_run_without_it():
    batch = image_inputs(8, batch=5, seed=1)
    batch["labels"] = torch.tensor([0, 1, 2, 0, 1])
    poisoned = {k: v.clone() for k, v in batch.items()}
    poisoned["pixel_values"][2, 0, 0, 0] = float("nan")
    clean = {k: torch.cat([v[:2], v[3:]]) for k, v in batch.items()}
    results = []
    for data in (poisoned, clean):
        model = vit_model()
        step = PrivateStep(
            model,
            torch.optim.SGD(active_parameters(model).values(), lr=0.5),
            noise_multiplier=0.8,
            per_sample_max_grad_norm=C,
            generator=SecureRandom(5, "noise"),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(data, expected_batch_size=5)
        results.append((model, step.dp.dropped_samples, caught))
    (poisoned_model, dropped, caught), (clean_model, clean_dropped, _) = results
    assert dropped == 1 and clean_dropped == 0
    assert any(issubclass(w.category, LALoraWarning) and "non-finite" in str(w.message) for w in caught)
    clean_params = dict(clean_model.named_parameters())
    for name, param in poisoned_model.named_parameters():
        assert torch.isfinite(param).all(), name
        torch.testing.assert_close(param, clean_params[name], rtol=1e-6, atol=1e-7)


def test_empty_batch_takes_a_noise_only_step():
    model = roberta_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = PrivateStep(
        model,
        torch.optim.SGD(active_parameters(model).values(), lr=0.5),
        noise_multiplier=1.0,
        per_sample_max_grad_norm=C,
        generator=SecureRandom(0, "noise"),
    )
    empty = {k: v[:0] for k, v in text_batch().items()}
    out = step(empty, expected_batch_size=4)
    assert out["batch_size"] == 0
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved and all(p.requires_grad for n, p in model.named_parameters() if n in moved)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"noise_multiplier": -1.0}, "`noise_multiplier` must be a finite number >= 0"),
        ({"per_sample_max_grad_norm": 0.0}, "`per_sample_max_grad_norm` must be > 0"),
        ({"per_sample_max_grad_norm": -1.0}, "`per_sample_max_grad_norm` must be > 0"),
    ],
)
def test_bad_dp_arguments(kwargs, match):
    args = {"noise_multiplier": 1.0, "per_sample_max_grad_norm": 1.0, **kwargs}
    with pytest.raises(ConfigError, match=match):
        GradientPrivatizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), **args)


def test_noise_is_drawn_and_summed_in_float32_for_a_bfloat16_adapter():
    # Prepare: a bf16 parameter with zero per-sample gradients, so the privatised gradient is the noise alone
    param = torch.nn.Parameter(torch.zeros(400, 250, dtype=torch.bfloat16))
    opt = GradientPrivatizer(
        torch.optim.SGD([param], lr=1.0),
        noise_multiplier=2.0,
        per_sample_max_grad_norm=0.5,
        generator=SecureRandom(0, "noise"),
    )
    grad_samples = {"w": torch.zeros(4, 400, 250, dtype=torch.bfloat16)}
    # Execute
    noisy = opt.privatize(grad_samples, {"w": param}, expected_batch_size=4)["w"]
    # Assert: float32 noise of std sigma * C / B, not rounded to bfloat16's 8-bit mantissa
    assert noisy.dtype == torch.float32
    assert abs(float(noisy.std()) / (2.0 * 0.5 / 4) - 1) < 0.01
    off_grid = (noisy != noisy.to(torch.bfloat16).to(torch.float32)).float().mean()
    assert off_grid > 0.9


def test_bf16_per_sample_gradients_are_clipped_to_c_computed_in_float32():
    # Prepare: 4,000 bf16 per-sample gradients of few coordinates, above C (squares rounded to bf16's 8 bits
    # overshot C by up to 0.17 %)
    g = torch.Generator().manual_seed(3)
    samples = {"a": (torch.randn(4000, 3, generator=g) * 3.0).to(torch.bfloat16)}
    opt = GradientPrivatizer(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
        noise_multiplier=0.0,
        per_sample_max_grad_norm=1.0,
    )
    # Execute: the clipped per-example gradients (clip factor times the gradient, as `sum_clipped` applies it)
    factors = opt.clip_factors(samples)
    clipped = samples["a"].float() * factors.float().unsqueeze(1)
    # Assert: every clipped example within C to float32 rounding
    assert float(clipped.norm(dim=1).max()) <= 1.0 + 1e-6
