"""An empirical privacy audit of the noisy step (canary membership inference, Jagielski et al. 2020 /
Nasr et al. 2021 style).

Per trial, the mechanism runs once on a batch D that holds a canary example and once on D' = D without it
(fresh noise each time, everything else fixed and known to the attacker). The attacker observes the released
noisy gradient and scores it by its projection on the canary's (noise-free) contribution. A threshold picked on
calibration trials turns scores into guesses "canary in" / "canary out"; on fresh evaluation trials the 95 %
Clopper-Pearson upper bounds of the false-positive and false-negative rates give the empirical lower bound

    eps_lb = max(log((1 - delta - FNR_u) / FPR_u), log((1 - delta - FPR_u) / FNR_u))

which, for a correct mechanism, cannot exceed the true epsilon (with probability >= 95 %). The accountant's
epsilon is compared at the same sigma, q = 1 (no subsampling: the batch is fixed), steps and delta.

- correct mechanism: eps_lb <= eps_accountant (and > 0: the audit has some power);
- noise switched off on the optimizer object after the accountant was told sigma (`noise_multiplier = 0.0`
  behind its back): the two worlds separate perfectly and eps_lb >= 3 * eps_accountant, so the audit can fail.

All draws are seeded, so the test is deterministic.
"""

import math

import numpy as np
import pytest
import torch
from peft import get_peft_model
from scipy.stats import beta

import peft_lalora  # noqa: F401
from peft_lalora import LALoraConfig
from peft_lalora.privacy import GradientPrivatizer, PrivateStep, active_parameters, compute_epsilon
from peft_lalora.privacy.secure_random import SecureRandom

DELTA = 1e-5
C = 0.5
ALPHA = 0.05  # 95 % joint confidence: alpha / 2 for each of the two Clopper-Pearson bounds (Bonferroni)


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of steps on tiny tensors: intra-op threads only add overhead (the conv1d of the low-pass stage
    most of all, on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- the statistics (independent of the code under test) ----------------------------------------------------
def clopper_pearson_upper(errors: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial rate."""
    if errors >= trials:
        return 1.0
    return float(beta.ppf(1.0 - alpha, errors + 1, trials - errors))


def epsilon_lower_bound(scores_in: np.ndarray, scores_out: np.ndarray, threshold: float, delta: float) -> float:
    """Empirical epsilon lower bound of the test "canary in iff score > threshold"."""
    fnr_u = clopper_pearson_upper(int((scores_in <= threshold).sum()), len(scores_in), ALPHA / 2)
    fpr_u = clopper_pearson_upper(int((scores_out > threshold).sum()), len(scores_out), ALPHA / 2)
    candidates = [0.0]
    for numerator, denominator in ((1.0 - delta - fnr_u, fpr_u), (1.0 - delta - fpr_u, fnr_u)):
        if numerator > 0:
            candidates.append(math.log(numerator / denominator))
    return max(candidates)


def best_threshold(scores_in: np.ndarray, scores_out: np.ndarray, delta: float) -> float:
    """The threshold (among midpoints of the pooled calibration scores) with the largest bound."""
    pooled = np.unique(np.concatenate([scores_in, scores_out]))
    midpoints = np.concatenate([[pooled[0] - 1.0], (pooled[:-1] + pooled[1:]) / 2, [pooled[-1] + 1.0]])
    grid = midpoints[np.linspace(0, len(midpoints) - 1, min(len(midpoints), 400)).astype(int)]
    return float(max(grid, key=lambda t: epsilon_lower_bound(scores_in, scores_out, t, delta)))


def audit(release_in, release_out, calibration: int, evaluation: int) -> float:
    """eps_lb from `calibration` + `evaluation` trials per world; `release_*()` returns one noisy score."""
    scores_in = np.array([release_in() for _ in range(calibration + evaluation)])
    scores_out = np.array([release_out() for _ in range(calibration + evaluation)])
    threshold = best_threshold(scores_in[:calibration], scores_out[:calibration], DELTA)
    return epsilon_lower_bound(scores_in[calibration:], scores_out[calibration:], threshold, DELTA)


def test_bound_statistics_on_hand_computed_values():
    # 0 errors in n trials: the upper bound is 1 - (alpha/2)^(1/n)
    assert clopper_pearson_upper(0, 1000, 0.025) == pytest.approx(1 - 0.025 ** (1 / 1000), rel=1e-9)
    assert clopper_pearson_upper(5, 5, 0.025) == 1.0
    # perfect separation with n trials per world: log((1 - delta - u) / u), u = 1 - 0.025^(1/n)
    u = 1 - 0.025 ** (1 / 4000)
    perfect = epsilon_lower_bound(np.ones(4000), np.zeros(4000), 0.5, DELTA)
    assert perfect == pytest.approx(math.log((1 - DELTA - u) / u), rel=1e-9)
    # identical worlds: no evidence at all
    assert epsilon_lower_bound(np.zeros(4000), np.zeros(4000), 0.5, DELTA) == 0.0


# ----- audit 1: the GradientPrivatizer stages (clip, sum, noise, scale, low-pass) on synthetic per-sample gradients -----
def synthetic_mechanism(sigma: float, steps: int, seed: int):
    """A (d_out x r) LoRA-B-shaped tensor, 7 fixed background examples and a canary whose gradient (norm 40 C,
    so it is clipped to C) lies along a fixed, smooth direction; the low-pass stage is on, as in LA-LoRA."""
    g = torch.Generator().manual_seed(seed)
    shape = (24, 4)
    background = torch.randn(7, *shape, generator=g) * torch.tensor([0.1, 0.3, 1.0, 3.0, 0.2, 2.0, 0.05]).view(7, 1, 1)
    # a smooth direction along d_out (the axis the low-pass filter smooths), so the filter keeps the canary's signal
    direction = torch.cos(torch.linspace(0, 1.5, shape[0])).unsqueeze(1) * torch.randn(1, shape[1], generator=g)
    canary = (direction / direction.norm() * 40 * C).unsqueeze(0)
    opt = GradientPrivatizer(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(shape))], lr=1.0),
        noise_multiplier=sigma,
        per_sample_max_grad_norm=C,
        factor_of={"w": "B"},
        lowpass_kernel=(1, 4, 6, 4, 1),
        generator=SecureRandom(seed + 1, "noise"),
    )
    params = {"w": torch.zeros(shape)}
    batch_in, batch_out = {"w": torch.cat([background, canary])}, {"w": background}

    def released(batch):  # `steps` releases of the same batch (q = 1), summed: the attacker's view
        return sum(opt.privatize(batch, params, expected_batch_size=8)["w"] for _ in range(steps))

    return opt, batch_in, batch_out, released


def test_audit_dp_optimizer(sigma=2.5, steps=1):
    # Prepare: the accountant is told sigma; the canary's noise-free contribution fixes the direction to score
    eps_accountant = compute_epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=DELTA)
    assert 1.0 <= eps_accountant <= 2.0  # moderate (1.69), so 3x stays reachable with the trials below
    opt, batch_in, batch_out, released = synthetic_mechanism(sigma, steps, seed=0)
    opt.noise_multiplier = 0.0
    mean_in, mean_out = released(batch_in), released(batch_out)
    opt.noise_multiplier = sigma
    signal = mean_in - mean_out
    assert signal.norm() > 0

    def score(batch):
        return lambda: float(((released(batch) - mean_out) * signal).sum() / signal.norm())

    # Execute + Assert: correct mechanism
    eps_correct = audit(score(batch_in), score(batch_out), calibration=500, evaluation=2000)
    assert 0.0 < eps_correct <= eps_accountant, (eps_correct, eps_accountant)

    # Execute + Assert: noise disabled behind the accountant's back is caught
    opt.noise_multiplier = 0.0
    eps_broken = audit(score(batch_in), score(batch_out), calibration=20, evaluation=2000)
    assert eps_broken >= 3 * eps_accountant, (eps_broken, eps_accountant)


# ----- audit 2: the whole PrivateStep (hooks per-sample gradients, DP stages, SGD) on a tiny LoRA model --------
# (without the low-pass stage: the canary's direction here is whatever the model gives, and smoothing would only
# weaken the projection test; audit 1 covers the low-pass stage)
class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 12)
        self.fc2 = torch.nn.Linear(12, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_lora_step(sigma: float, seed: int):
    torch.manual_seed(seed)
    model = get_peft_model(TinyNet(), LALoraConfig(r=2, lora_alpha=4, target_modules=["fc1"]))
    with torch.no_grad():  # non-zero B so that A's gradient is not zero either
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.base_model.set_trainable_factors({"B"})
    params = active_parameters(model)
    assert params and all("lora_B" in n for n in params)
    lr = 0.1
    step = PrivateStep(
        model,
        torch.optim.SGD(params.values(), lr=lr),
        noise_multiplier=sigma,
        per_sample_max_grad_norm=C,
        lowpass_kernel=None,
        backend="hooks",
        generator=SecureRandom(seed + 1, "noise"),
    )
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(6, 6, generator=g)
    x[-1] *= 30.0  # the canary: a large input, so its gradient is clipped to C
    batch_in = {"x": x, "labels": torch.tensor([0, 1, 0, 1, 1, 0])}
    batch_out = {k: v[:-1] for k, v in batch_in.items()}
    start = {n: p.detach().clone() for n, p in params.items()}

    def released(batch):
        """One PrivateStep from the fixed start; the attacker sees the update (parameters after - before)."""
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
        step(batch, expected_batch_size=6)
        return torch.cat([(p.detach() - start[n]).flatten() for n, p in params.items()])

    return step, batch_in, batch_out, released


def test_audit_private_step_end_to_end():
    sigma = 2.5
    eps_accountant = compute_epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=DELTA)
    step, batch_in, batch_out, released = tiny_lora_step(sigma, seed=0)
    step.dp.noise_multiplier = 0.0
    mean_in, mean_out = released(batch_in), released(batch_out)
    step.dp.noise_multiplier = sigma
    signal = mean_in - mean_out
    # the canary is clipped, so its noise-free contribution to the SGD update has norm exactly lr * C / B
    assert float(signal.norm()) == pytest.approx(0.1 * C / 6, rel=1e-4)

    def score(batch):
        return lambda: float(((released(batch) - mean_out) * signal).sum() / signal.norm())

    eps_correct = audit(score(batch_in), score(batch_out), calibration=300, evaluation=1200)
    assert 0.0 < eps_correct <= eps_accountant, (eps_correct, eps_accountant)

    step.dp.noise_multiplier = 0.0  # behind the accountant's back
    eps_broken = audit(score(batch_in), score(batch_out), calibration=20, evaluation=1500)
    assert eps_broken >= 3 * eps_accountant, (eps_broken, eps_accountant)
    step.close()
