"""Validation of `FederatedDPArguments`' round-policy fields: the aggregation rule (`federated.rules`) and
client-level DP (`federated.client_dp`), kept apart from `arguments` (one concept per file)."""

from __future__ import annotations

import warnings

from .checks import check_choice, check_number, check_positive, given_settings
from .errors import ConfigError, LALoraWarning
from .federated.rules import rule_names


def validate_round_policy(args) -> None:
    """`aggregation`, `aggregation_trim` and the client-level DP settings of `FederatedDPArguments`."""
    check_choice("aggregation", args.aggregation, rule_names())
    fix = "E.g. 0.2 drops the top and bottom 20% of the values per coordinate."
    check_number("aggregation_trim", args.aggregation_trim, "a fraction in [0, 0.5)", lambda v: 0 <= v < 0.5, fix)
    if args.aggregation == "trimmed_mean" and args.aggregation_weights != "uniform":
        raise ConfigError(
            f"`aggregation`='trimmed_mean' gives every client one vote, but `aggregation_weights` is "
            f"{args.aggregation_weights!r}. Set `aggregation_weights='uniform'`, or use `aggregation='mean'`."
        )
    _validate_client_dp(args)


def _validate_client_dp(args) -> None:
    names = ("client_clip_norm", "client_noise_multiplier", "client_target_epsilon", "client_target_delta")
    if not args.client_dp:
        if given := given_settings(args, names):
            raise ConfigError(
                f"{given} set without `client_dp=True`: client-level DP is off. Set `client_dp=True`, or drop them."
            )
        return
    if args.client_clip_norm is None:
        raise ConfigError(
            "`client_dp=True` needs `client_clip_norm`, the clip norm S of a client's update (e.g. 0.1)."
        )
    check_positive("client_clip_norm", args.client_clip_norm, "the L2 norm each client's whole update is clipped to")
    if (args.client_target_epsilon is None) == (args.client_noise_multiplier is None):
        raise ConfigError(
            "`client_dp=True` needs exactly one of `client_target_epsilon` (z calibrated over num_rounds) and "
            f"`client_noise_multiplier` (epsilon reported), got client_target_epsilon="
            f"{args.client_target_epsilon!r}, client_noise_multiplier={args.client_noise_multiplier!r}."
        )
    if args.client_target_epsilon is not None:
        check_positive("client_target_epsilon", args.client_target_epsilon, "e.g. 1.0, 3.0 or 8.0")
    else:
        check_positive("client_noise_multiplier", args.client_noise_multiplier, "e.g. 1.0; 0 would be no noise")
    delta = args.client_target_delta
    if delta is not None and not (isinstance(delta, float) and 0 < delta < 1 / args.num_clients):
        raise ConfigError(
            f"`client_target_delta` must be in (0, 1/num_clients = {1 / args.num_clients:g}), got {delta!r}: a "
            "delta of 1/N or more allows releasing one client's data outright. Default: min(1e-5, 1/N)."
        )
    if args.aggregation != "mean" or args.aggregation_weights != "uniform":
        raise ConfigError(
            f"`client_dp=True` releases a noised sum over a fixed denominator, so it needs `aggregation='mean'` "
            f"and `aggregation_weights='uniform'`, got {args.aggregation!r} and {args.aggregation_weights!r}."
        )
    if not args.dp and args.noise_seed is not None:
        warnings.warn(
            f"`noise_seed`={args.noise_seed} fixes the client sampling and the server's noise: this run has NO "
            "client-level DP guarantee. Use it for tests and research only.",
            LALoraWarning,
            stacklevel=3,
        )
