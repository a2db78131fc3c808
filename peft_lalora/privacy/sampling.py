"""Poisson sampling of a client's batches, the sampling scheme the privacy accountant assumes.

Each local step draws its batch by including every example of the client's shard independently with
probability q = batch_size / n_k. The batch size is therefore random (Binomial(n_k, q)) and may be zero: an
empty batch still takes a noise-only step and is still accounted. Shuffled fixed-size batches are not Poisson
sampling and would make the reported epsilon wrong.
"""

from __future__ import annotations

import torch

from ..checks import check_int
from ..errors import ConfigError
from .accounting import _check_q
from .secure_random import SecureRandom

__all__ = ["poisson_sample", "sample_rate_for"]


def poisson_sample(num_examples: int, sample_rate: float, generator: SecureRandom) -> torch.Tensor:
    """One Poisson-sampled batch of a shard of `num_examples` (>= 1), each included with probability `sample_rate`
    in (0, 1], drawn from `generator`: the client's sampling stream keyed by the private root (never a torch
    generator, whose 32- or 64-bit state would let anyone re-create the batches). Returns the sorted included
    indices (a 1-D `torch.long` tensor, possibly empty).
    """
    n = check_int("num_examples", num_examples, 1, "A client needs at least one example to be sampled.")
    q = _check_q(sample_rate)
    if not isinstance(generator, SecureRandom):
        raise ConfigError(
            f"`generator` must be a peft_lalora SecureRandom, got {type(generator).__name__}. Pass the client's "
            "stream keyed by the private root, e.g. `SecureRandom(root, 'sample', round, client)`."
        )
    # One float64 uniform in (0, 1) per example; inclusion iff u < q (q == 1 keeps everything).
    return torch.nonzero(generator.bernoulli(n, q), as_tuple=False).flatten().to(dtype=torch.long)


def sample_rate_for(batch_size: int, num_examples: int, *, client=None, unit: str = "examples") -> float:
    """The Poisson sampling rate q = batch_size / num_examples (>= 1 each) of a client; `num_examples` counts its
    privacy units (examples, or users under `unit="users"`: `privacy.users`). `client` and `unit` are named in the
    errors; batch_size > num_examples (q > 1) is refused.
    """
    who = "" if client is None else f" (client {client})"
    bs = check_int("batch_size", batch_size, 1, "Use the expected number of examples per local step.")
    n = check_int("num_examples", num_examples, 1, f"Every client shard{who} needs at least one example.")
    if bs > n:
        raise ConfigError(
            f"`batch_size` must be <= the client's number of {unit}{who}: got batch_size={bs} and "
            f"num_{unit}={n}, so q = {bs}/{n} = {bs / n:.4g} > 1, which Poisson sampling cannot realise. "
            f"Use batch_size <= {n}, or repartition so that every client holds at least {bs} {unit}."
        )
    return bs / n
