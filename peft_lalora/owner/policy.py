"""A SuperNode's privacy policy: the guarantee its data owner sets (`--node-config`), which a run can only tighten.

The run config is the server's: without a policy, a server could ask a client for a noise-free update (`dp=false`),
for noise it can re-create (`noise-seed`), for an epsilon of 1e6 or inf (`noise-multiplier=0`), or for delta 0.5.
The client checks the run's settings against its node's policy before it loads its data, and refuses
(`PolicyError`: nothing trained, nothing charged) a run that would loosen it.

Node config keys (all optional; the two `allow-` permissions are false unless set):
    max-epsilon           the largest epsilon this data may ever spend (lifetime, over every run; the ledger keeps
                          the smallest cap it was opened with). Default `DEFAULT_MAX_EPSILON` = 8.0.
    max-delta             the largest delta of any run. Default 1e-5. A delta >= 1 / n (n: this node's examples) is
                          refused whatever the node allows: it lets a mechanism release one example outright.
    min-noise-multiplier  the smallest sigma of a local step (given or calibrated). Default: any sigma > 0.
    allow-non-private     a run may set `dp=false` (a noise-free update and its loss leave the node).
    allow-fixed-noise-seed  a run may fix the noise with `noise-seed` (whoever knows it can re-create the noise and
                          the batches: no guarantee).
    min-privacy-unit      "example" (default) or "user": with "user", a run must protect users with the owner's own
                          `user-column`: a server can neither downgrade the unit nor name a column of its choosing
                          (a column unique per row, e.g. an index, would make it example-level DP again).
    user-column           the column of this node's data that names each example's user; required with
                          `min-privacy-unit = "user"`, and a user-level run must name the same column.

Why a default cap rather than a refusal when `max-epsilon` is missing: a node started without a policy still has
a finite guarantee, at the upper end of what DP fine-tuning reports (epsilon 1, 3 or 8) and the recipe's own
target, and existing SuperNode commands keep working. The cap is written to the node's ledger like any cap (the
budget only shrinks): an owner who wants more must say so before the first run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from ..arguments import PRIVACY_UNITS  # weakest first
from ..errors import ConfigError, PolicyError

DEFAULT_MAX_EPSILON = 8.0
DEFAULT_MAX_DELTA = 1e-5


@dataclass(frozen=True)
class NodePolicy:
    """The node config keys of the module docstring, as fields in snake case (`user_column` "" when not set)."""

    max_epsilon: float = DEFAULT_MAX_EPSILON
    max_delta: float = DEFAULT_MAX_DELTA
    min_noise_multiplier: float = 0.0
    allow_non_private: bool = False
    allow_fixed_noise_seed: bool = False
    min_privacy_unit: str = "example"
    user_column: str = ""

    @classmethod
    def from_node_config(cls, node_config: Mapping) -> NodePolicy:
        """The policy a SuperNode was started with (its `--node-config`); a missing key takes its default."""
        kwargs = {}
        for key, name in _KEYS.items():
            if name in node_config:
                raise ConfigError(
                    f"The node config has `{name}`; node config keys are kebab case: "
                    f"write `{key}` (a misspelt policy key would silently fall back to its default)."
                )
            if key in node_config:
                kwargs[name] = _value(key, node_config[key], type(getattr(cls, name)))
        policy = cls(**kwargs)
        if policy.min_privacy_unit == "user" and not policy.user_column:
            raise ConfigError(
                "`min-privacy-unit` (node config) is 'user' but `user-column` is not set: name the column of this "
                "node's data that holds each example's user, e.g. --node-config 'min-privacy-unit=\"user\" "
                'user-column="patient_id"\'.'
            )
        return policy

    def as_node_config(self) -> dict:
        """The policy as node config keys (the client logs it when a run starts)."""
        return {key: getattr(self, name) for key, name in _KEYS.items()}

    def check(self, args) -> None:
        """Refuse a run (`FederatedDPArguments` from its run config) that would loosen this policy."""
        if not args.dp:
            if not self.allow_non_private:
                raise PolicyError(
                    "The server's run config asks for `dp`=False (a noise-free update and its loss), but this "
                    "node's `allow-non-private` is false. Run with `dp`=true, or (the node's owner) start the "
                    "SuperNode with --node-config 'allow-non-private=true' for a non-private trial."
                )
            return
        self._check_unit(args)
        if args.noise_seed is not None and not self.allow_fixed_noise_seed:
            raise PolicyError(
                f"The server's run config asks for `noise-seed`={args.noise_seed!r} (noise the server can "
                "re-create: no privacy), but this node's `allow-fixed-noise-seed` is false. Leave `noise-seed` "
                "out, or (the node's owner, for tests only) set --node-config 'allow-fixed-noise-seed=true'."
            )
        for key, asked, cap in (
            ("epsilon", args.target_epsilon, self.max_epsilon),
            ("delta", args.target_delta, self.max_delta),
        ):
            if asked is not None and asked > cap:
                raise PolicyError(
                    f"The server's run config asks for `target-{key}`={asked!r}, above this node's `max-{key}`="
                    f"{cap!r}. Run with `target-{key}` <= {cap!r}, or (the node's owner) raise `max-{key}` in "
                    "--node-config."
                )
        if args.noise_multiplier is not None:
            self._check_sigma(args.noise_multiplier)

    def _check_unit(self, args) -> None:
        """A run protects at least `min-privacy-unit`, and users by the owner's `user-column`."""
        if PRIVACY_UNITS.index(args.privacy_unit) < PRIVACY_UNITS.index(self.min_privacy_unit):
            raise PolicyError(
                f"The server's run config asks for `privacy-unit`={args.privacy_unit!r}, but this node's "
                f"`min-privacy-unit` is {self.min_privacy_unit!r}: its users must be protected, not single "
                f'examples. Run with `privacy-unit`="user" and `user-column`={self.user_column!r}.'
            )
        if args.privacy_unit == "user" and self.user_column and args.user_column != self.user_column:
            raise PolicyError(
                f"The server's run config names `user-column`={args.user_column!r}, but this node's users are in "
                f"`user-column`={self.user_column!r} (node config): another column could group the examples "
                f"otherwise than by person. Run with `user-column`={self.user_column!r}."
            )

    def check_plan(self, plan, num_examples: int) -> None:
        """Refuse what the run's settings give on this node's `num_examples` privacy units (examples, or users
        under user-level DP; `plan`: its `PrivacyPlan`): the delta (the default min(1e-5, 1 / n) included) and the sigma (given or calibrated)."""
        limit = f"<= {self.max_delta!r}" if self.max_delta < 1.0 / num_examples else f"< {1.0 / num_examples:.3g}"
        if plan.delta > self.max_delta or plan.delta >= 1.0 / num_examples:
            raise PolicyError(
                f"The run accounts at `target-delta`={plan.delta!r} on this node's {num_examples} privacy units "
                "(examples, or users under user-level DP), but "
                f"this node allows delta <= `max-delta`={self.max_delta!r} and < 1/n = {1.0 / num_examples:.3g}. "
                f"Run with `target-delta` {limit}."
            )
        calibrated = (
            "" if plan.target_epsilon is None else f" (calibrated for `target-epsilon`={plan.target_epsilon!r})"
        )
        self._check_sigma(plan.noise_multiplier, calibrated)

    def _check_sigma(self, sigma: float, calibrated: str = "") -> None:
        if sigma <= 0 or sigma < self.min_noise_multiplier:
            rule = f">= {self.min_noise_multiplier!r}" if self.min_noise_multiplier > 0 else "> 0"
            raise PolicyError(
                f"The run's `noise-multiplier`={sigma!r}{calibrated} is below this node's limit: sigma must be {rule} "
                f"(`min-noise-multiplier`={self.min_noise_multiplier!r}; sigma 0 is epsilon = inf). Run with more "
                "noise, or a smaller `target-epsilon`."
            )


_KEYS = {f.name.replace("_", "-"): f.name for f in fields(NodePolicy)}  # node config key -> field
_RANGES = {  # node config key -> (is the value allowed, the rule as the error states it)
    "max-epsilon": (lambda v: v > 0, "> 0"),
    "max-delta": (lambda v: 0 < v < 1, "in (0, 1)"),
    "min-noise-multiplier": (lambda v: v >= 0, ">= 0"),
}


def _value(key: str, value, kind: type):
    """A node config value of the policy's field type, validated (a bad policy is the owner's error)."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` (node config) must be true or false, got {value!r}.")
        return value
    if key == "min-privacy-unit":
        if value not in PRIVACY_UNITS:
            raise ConfigError(f"`{key}` (node config) must be one of {PRIVACY_UNITS}, got {value!r}.")
        return value
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"`{key}` (node config) must be a non-empty string (a column name), got {value!r}.")
        return value
    allowed, rule = _RANGES[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not allowed(value)
    ):
        raise ConfigError(f"`{key}` (node config) must be a finite number {rule}, got {value!r}.")
    return float(value)
