"""Poisson sampling of client batches (batch sizes ~ Binomial(n, q), reproducible, possibly empty)."""

import numpy as np
import pytest
import torch
from scipy import stats

from peft_lalora.errors import ConfigError
from peft_lalora.privacy.sampling import poisson_sample, sample_rate_for
from peft_lalora.privacy.secure_random import SecureRandom


def _chi_square_p(sizes: np.ndarray, n: int, q: float) -> float:
    """Goodness of fit of observed batch sizes to Binomial(n, q); bins with expected count < 5 are pooled."""
    draws = len(sizes)
    observed = np.bincount(sizes, minlength=n + 1).astype(float)
    expected = draws * stats.binom.pmf(np.arange(n + 1), n, q)
    obs_bins, exp_bins, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed, expected):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            obs_bins.append(acc_o)
            exp_bins.append(acc_e)
            acc_o, acc_e = 0.0, 0.0
    obs_bins[-1] += acc_o  # pool the upper tail into the last bin
    exp_bins[-1] += acc_e
    assert len(obs_bins) >= 5
    return stats.chisquare(obs_bins, exp_bins).pvalue


@pytest.mark.parametrize("n, q", [(40, 0.1), (200, 0.03), (9, 0.5)])
def test_batch_sizes_follow_binomial(n, q):
    # Prepare
    generator = SecureRandom(1234, "sample")
    draws = 20_000
    # Execute
    sizes = np.array([len(poisson_sample(n, q, generator)) for _ in range(draws)])
    # Assert: chi-square goodness of fit, and the first two moments
    assert _chi_square_p(sizes, n, q) > 1e-3
    assert abs(sizes.mean() - n * q) < 5 * np.sqrt(n * q * (1 - q) / draws)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.05)


def test_each_example_included_with_probability_q_independently():
    n, q, draws = 30, 0.2, 20_000
    generator = SecureRandom(7, "sample")
    included = torch.zeros(draws, n, dtype=torch.bool)
    for i in range(draws):
        included[i, poisson_sample(n, q, generator)] = True
    freq = included.float().mean(0)
    # every example: |freq - q| within 5 binomial standard errors
    assert torch.all((freq - q).abs() < 5 * (q * (1 - q) / draws) ** 0.5)
    # pairwise independence: P(i and j) ~ q^2 for a few pairs
    for i, j in [(0, 1), (3, 17), (28, 29)]:
        joint = (included[:, i] & included[:, j]).float().mean().item()
        assert joint == pytest.approx(q * q, abs=5 * (q * q / draws) ** 0.5)


def test_indices_sorted_unique_long_in_range():
    generator = SecureRandom(0, "sample")
    for _ in range(50):
        idx = poisson_sample(100, 0.3, generator)
        assert idx.dtype == torch.long and idx.dim() == 1
        assert torch.equal(idx, torch.unique(idx))  # unique() returns sorted values
        assert idx.numel() == 0 or (idx.min() >= 0 and idx.max() < 100)


def test_deterministic_under_the_key():
    a = [poisson_sample(500, 0.05, SecureRandom(42, "sample")) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    g1, g2 = SecureRandom(3, "sample"), SecureRandom(3, "sample")
    seq1 = [poisson_sample(50, 0.2, g1) for _ in range(20)]
    seq2 = [poisson_sample(50, 0.2, g2) for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(seq1, seq2))
    other = [poisson_sample(50, 0.2, SecureRandom(4, "sample")) for _ in range(20)]
    assert not all(torch.equal(x, y) for x, y in zip(seq1, other))


def test_empty_batches_occur_at_small_q():
    generator = SecureRandom(0, "sample")
    batches = [poisson_sample(10, 0.01, generator) for _ in range(200)]
    empty = [b for b in batches if b.numel() == 0]
    # P(empty) = 0.99 ** 10 = 0.904, so about 181 of 200
    assert len(empty) > 150
    assert all(b.shape == (0,) and b.dtype == torch.long for b in empty)


def test_q_one_takes_every_example():
    assert torch.equal(poisson_sample(7, 1.0, SecureRandom(0, "sample")), torch.arange(7))


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, float("nan"), True])
def test_bad_sample_rate_refused(q):
    with pytest.raises(ConfigError, match=r"`sample_rate` must be a number in \(0, 1\]"):
        poisson_sample(10, q, SecureRandom.fresh())


def test_bad_num_examples_and_generator_refused():
    with pytest.raises(ConfigError, match="`num_examples` must be an integer >= 1, got 0"):
        poisson_sample(0, 0.5, SecureRandom.fresh())
    with pytest.raises(ConfigError, match="`generator` must be a peft_lalora SecureRandom, got int"):
        poisson_sample(10, 0.5, 123)
    with pytest.raises(ConfigError, match="`generator` must be a peft_lalora SecureRandom, got Generator"):
        poisson_sample(10, 0.5, torch.Generator().manual_seed(0))  # 32 bits of state: refused


def test_sample_rate_for():
    assert sample_rate_for(8, 200) == 8 / 200
    assert sample_rate_for(5, 5) == 1.0
    with pytest.raises(
        ConfigError, match=r"`batch_size` must be <= .*client 3.*batch_size=32 and num_examples=20.*q = 32/20"
    ):
        sample_rate_for(32, 20, client=3)
    with pytest.raises(ConfigError, match="Use batch_size <= 20"):
        sample_rate_for(32, 20)
    with pytest.raises(ConfigError, match="`batch_size` must be an integer >= 1, got 0"):
        sample_rate_for(0, 20)
    with pytest.raises(ConfigError, match="`num_examples` must be an integer >= 1, got 2.5"):
        sample_rate_for(1, 2.5)
