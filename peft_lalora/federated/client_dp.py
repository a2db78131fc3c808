"""Client-level DP on the server's round (DP-FedAvg, McMahan et al. 2018): Poisson sampling of the clients at rate
q = m / N, each surviving client's whole update (every tensor it sends, all factors and the head) clipped to S,
Gaussian noise of std z S on the sum of every tensor the round's clients train, and the sum divided by the
expected count m (a fixed denominator: the sensitivity of the release to one client is S / m, whoever took part).

`ClientDPAggregator` wraps the round's aggregation rule, as flwr's `DifferentialPrivacyServerSideFixedClipping`
wraps a strategy, but it needs the rule's per-tensor sums (`aggregation="mean"`): a rule whose output is not a
sum (e.g. the trimmed mean) has no bounded per-client sensitivity under add/remove of a client. flwr's wrapper is
not used (see README, "Client-level DP"): it draws its noise from NumPy's global generator, samples a fixed
number of clients, clips whole models rather than partial deltas, and its accountant refuses a custom
`aggregate_train`. The sampling and the noise come from `SecureRandom` keyed by the server's private root.
Every round releases (no abort on the number of survivors: that count is not noised).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..privacy.client_level import ClientLevelPlan
from ..privacy.secure_random import SecureRandom
from ..tuner.roles import trained_tensor_names
from ..tuner.schedule import trainable_factors
from .aggregation import apply_delta


def sample_clients(root, round_idx: int, num_clients: int, rate: float) -> list:
    """Poisson sampling: each client independently with probability `rate`, from the private root (sorted ids)."""
    included = SecureRandom(root, "client-sampling", round_idx).bernoulli(num_clients, rate)
    return [k for k in range(num_clients) if bool(included[k])]


@torch.no_grad()
def clip_update(delta: dict, clip_norm: float) -> dict:
    """`delta` scaled by min(1, S / ||delta||), the L2 norm over all its tensors (computed in float64)."""
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))
    if norm <= clip_norm:
        return dict(delta)
    scale = clip_norm / norm
    return {n: v * scale for n, v in delta.items()}


def round_tensor_names(adapter_config, names: list, adapter_name: str, round_idx: int, local_steps: int) -> list:
    """The tensors every client of round `round_idx` trains and sends (public: the alternation schedule), the
    ones the noise covers even when no client survives: the head, and the factors trained at some local step."""
    factors = set()
    for step in range(local_steps):
        factors |= trainable_factors(adapter_config, round_idx, step)
    return trained_tensor_names(names, adapter_name, factors)


class ClientDPAggregator:
    """
    Args:
        inner: the round's aggregation rule; it must keep per-tensor `sums` (`aggregation="mean"`).
        plan (`ClientLevelPlan`): z, S and the expected number of clients m.
        root: the server's private root (the noise's key, with the round and the tensor's name).
        round_idx (`int`): the round.
        noised (`list[str]`): the round's tensors (`round_tensor_names`).
    """

    def __init__(self, inner, plan: ClientLevelPlan, root, round_idx: int, noised: list):
        if not hasattr(inner, "sums"):
            raise ConfigError(
                f"`client_dp` needs an aggregation rule that releases a sum, got {type(inner).__name__}: use "
                "`aggregation='mean'`."
            )
        self.inner, self.plan, self.root, self.round_idx, self.noised = inner, plan, root, round_idx, list(noised)

    @property
    def survivors(self) -> int:
        return self.inner.survivors

    def add(self, delta: dict, weight: float = 1.0) -> None:
        """A client's update, clipped to S, with weight 1 (DP-FedAvg's uniform weights)."""
        self.inner.add(clip_update(delta, self.plan.clip_norm), 1.0)

    def reduce(self, reduce_fn=None) -> None:
        self.inner.reduce(reduce_fn)

    @torch.no_grad()
    def merged(self) -> dict:
        """The global adapter plus (sum + N(0, (z S)^2)) / m on every tensor of the round."""
        std = self.plan.noise_multiplier * self.plan.clip_norm
        release = {}
        for name in self.noised:
            total = self.inner.sums[name]
            dtype = torch.float64 if total.dtype == torch.float64 else torch.float32
            noise = SecureRandom(self.root, "client-noise", self.round_idx, name).normal(
                std, total.shape, device=total.device, dtype=dtype
            )
            release[name] = (total.to(dtype) + noise) / self.plan.expected_clients
        return apply_delta(self.inner.global_state, release)
