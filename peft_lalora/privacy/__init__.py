"""Sample-level differential privacy for LoRA: exact per-sample gradients, the DP-SGD step, Poisson sampling,
and per-client accounting."""

from .accounting import ACCOUNTANTS, PrivacyLedger, calibrate_noise_multiplier, compute_epsilon, default_delta
from .engine import NonPrivateStep, PrivateStep, active_parameters, factor_names
from .grad_sample import select_backend
from .losses import per_example_loss
from .optimizer import GradientPrivatizer
from .sampling import poisson_sample, sample_rate_for

__all__ = [
    "ACCOUNTANTS",
    "GradientPrivatizer",
    "NonPrivateStep",
    "PrivacyLedger",
    "PrivateStep",
    "active_parameters",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "default_delta",
    "factor_names",
    "per_example_loss",
    "poisson_sample",
    "sample_rate_for",
    "select_backend",
]


def __getattr__(name):
    if name == "DPOptimizer":  # its former name, which suggested an opacus DPOptimizer: kept for one release
        import warnings

        warnings.warn(
            "`peft_lalora.privacy.DPOptimizer` is now `GradientPrivatizer` (it is not an opacus "
            "`DPOptimizer`); the old name will be removed.",
            FutureWarning,
            stacklevel=2,
        )
        return GradientPrivatizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
