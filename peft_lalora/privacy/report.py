"""The run-level fields of a privacy report, shared by the in-process trainer and the Flower server: what the
arguments say about the guarantee (secret or fixed noise, clipping groups), and the report of a non-private run.
The per-client epsilons come from the ledgers (`PrivacyLedger.report`, or what each Flower client reported)."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional

from ..errors import ConfigError
from .accounting import REPORT_UNIT
from .secure_random import GENERATOR

UNITS = {  # `privacy_unit` -> the report's and the card's words for what one DP step protects
    "example": REPORT_UNIT,
    "user": "all the examples of one user of one client",
}
FIXED_SEED_WARNING = (
    "`noise_seed` was fixed: the DP noise and the Poisson batches can be re-created by anyone who "
    "knows it, so this run has NO differential-privacy guarantee, whatever epsilon says."
)


def non_private_report() -> dict:
    """The report of a run trained without differential privacy (`dp=False`): epsilon is infinite."""
    return {
        "epsilon": math.inf,
        "delta": None,
        "noise_multiplier": 0.0,
        "per_sample_max_grad_norm": None,
        "accountant": None,
        "unit": REPORT_UNIT,
        "dp": False,
        "clients": [],
    }


def run_privacy_fields(args) -> dict:
    """The fields every DP report carries from `FederatedDPArguments`: what is protected, the schedule and target,
    whether the noise was secret, and the clipping groups with their joint per-example sensitivity."""
    fields = {
        "dp": True,
        "unit": UNITS[args.privacy_unit],
        "privacy_unit": args.privacy_unit,
        "target_epsilon": args.target_epsilon,
        "num_rounds": args.num_rounds,
        "local_steps": args.local_steps,
        "secret_randomness": args.noise_seed is None,
        "noise_generator": GENERATOR,
    }
    if args.privacy_unit == "user":
        fields["user_column"] = args.user_column
    if args.noise_seed is not None:
        fields["noise_seed_warning"] = FIXED_SEED_WARNING
    if args.per_sample_head_max_grad_norm is not None:
        fields["clip_groups"] = {"lora": args.per_sample_max_grad_norm, "head": args.per_sample_head_max_grad_norm}
        fields["sensitivity"] = math.hypot(args.per_sample_max_grad_norm, args.per_sample_head_max_grad_norm)
    return fields


def with_client_level(report: dict, client_level, args) -> dict:
    """`report` with the client-level entry (`client_level`, unit "client") next to the per-client sample-level
    ones, and `guarantees`: which unit is protected, in one line each. Unchanged without client-level DP."""
    if client_level is None:
        return report
    if args.noise_seed is not None:
        client_level = {**client_level, "noise_seed_warning": FIXED_SEED_WARNING}
    sample = (
        f"sample-level ({report.get('unit')}): epsilon {report['epsilon']:.4g} per client, delta {report['delta']}"
        if report.get("dp")
        else "sample-level: NONE (`dp=False`): each client's local training is not private on its own"
    )
    client = f"client-level: epsilon {client_level['epsilon']:.4g}, delta {client_level['delta']:g}"
    return {**report, "client_level": client_level, "guarantees": [sample, client]}


# ----------------------------------------------------------------------------------------------- the schema
# One typed report that every writer builds (`PrivacyReport.from_dict(...)` of the fields it assembled, then
# `to_dict()` for privacy_report.json) and the card reads. Hand-written: no dataclass-to-JSON library in the
# dependencies keeps a report's optional keys as written (present with a None value vs absent) and its extras.
SCHEMA_VERSION = 1  # 0: a report written before `schema_version` existed (read leniently, see `from_dict`)
GUARANTEE_KEYS = ("delta", "noise_multiplier", "per_sample_max_grad_norm", "accountant")  # non-None when dp
CLIENT_REQUIRED = ("client", "epsilon", "sample_rate", "steps")
CLIENT_LEVEL_REQUIRED = ("unit", "epsilon", "delta", "noise_multiplier", "client_clip_norm", "sample_rate", "rounds")
_ARG = "privacy_report"


@dataclass
class PrivacyReport:
    """privacy_report.json, typed: the fields without a default are `REQUIRED`, those after them up to `extra` are
    `OPTIONAL` (the keys a writer may add; any other key is kept, unread, in `extra`). `clients` holds one dict per
    client (at least `CLIENT_REQUIRED`), and `client_level` the client-level entry (at least
    `CLIENT_LEVEL_REQUIRED`) or None. An optional field is written when it is not None or when the report it was
    read from held it (`present`)."""

    dp: bool
    epsilon: Optional[float]
    delta: Optional[float]
    noise_multiplier: Optional[float]
    per_sample_max_grad_norm: Optional[float]
    accountant: Optional[str]
    unit: str
    clients: list
    engine: Optional[str] = None
    privacy_unit: Optional[str] = None
    user_column: Optional[str] = None
    target_epsilon: Optional[float] = None
    num_rounds: Optional[int] = None
    local_steps: Optional[int] = None
    secret_randomness: Optional[bool] = None
    noise_generator: Optional[str] = None
    noise_seed_warning: Optional[str] = None
    clip_groups: Optional[dict] = None
    sensitivity: Optional[float] = None
    sigma_calibration: Optional[str] = None
    worst_case_epsilon: Optional[float] = None
    partition: Any = None
    earlier_spending: Any = None
    client_level: Optional[dict] = None
    guarantees: Optional[list] = None
    refused: Optional[list] = None
    unreported: Optional[dict] = None
    note: Optional[str] = None
    run: Optional[dict] = None
    extra: dict = field(default_factory=dict)
    present: frozenset = field(default=frozenset(), repr=False)
    schema_version: int = SCHEMA_VERSION

    @property
    def fixed_seed(self) -> bool:
        """The noise came from a fixed `noise_seed` (no guarantee). A report without the key: secret randomness."""
        return self.secret_randomness is False

    def to_dict(self) -> dict:
        """The JSON form: the required keys, the optional ones given, the extras and `schema_version`."""
        out = {k: getattr(self, k) for k in REQUIRED}
        out.update({k: getattr(self, k) for k in OPTIONAL if k in self.present or getattr(self, k) is not None})
        out.update(self.extra)
        out["schema_version"] = self.schema_version
        return out

    @classmethod
    def from_dict(cls, report) -> PrivacyReport:
        """Read a report. The current version strictly (a missing key raises, naming it); version 0 (no
        `schema_version`: written before it existed) by filling what can be derived (`dp` True, `unit` the
        example unit, `clients` none, `epsilon` the largest client's); a newer version is refused."""
        if isinstance(report, cls):
            return report
        if not isinstance(report, dict):
            raise ConfigError(
                f"`{_ARG}` must be a dict (privacy_report.json), a PrivacyReport or None, got {type(report).__name__}."
            )
        version = check_schema_version(report)
        data = dict(report)
        data.pop("schema_version", None)
        if version == 0:
            data = _upgrade_v0(data)
        if data.get("dp") and not data.get("clients"):
            # a DP run in which no client released (every one refused, or lost): no guarantee values to state
            for key in GUARANTEE_KEYS + ("epsilon",):
                data.setdefault(key, None)
        _require(data, REQUIRED, _ARG)
        if data["dp"] and data["clients"]:
            _require({k: v for k, v in data.items() if v is not None}, GUARANTEE_KEYS + ("epsilon",), _ARG)
        if not isinstance(data["clients"], list):
            raise ConfigError(f"`{_ARG}['clients']` must be a list, got {data['clients']!r}.")
        for i, entry in enumerate(data["clients"]):
            _require(entry, CLIENT_REQUIRED, f"{_ARG}['clients'][{i}]")
        if version > 0 and data.get("client_level") is not None:
            _require(data["client_level"], CLIENT_LEVEL_REQUIRED, f"{_ARG}['client_level']")
        known = set(REQUIRED) | set(OPTIONAL)
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
            present=frozenset(k for k in OPTIONAL if k in data),
            schema_version=version,
        )


_NAMES = [f.name for f in fields(PrivacyReport)]
REQUIRED = tuple(f.name for f in fields(PrivacyReport) if f.default is MISSING and f.default_factory is MISSING)
OPTIONAL = tuple(_NAMES[len(REQUIRED) : _NAMES.index("extra")])


def check_schema_version(report: dict, name: str = _ARG) -> int:
    """The report's `schema_version` (0 when it has none); a newer one than this library reads is refused."""
    version = report.get("schema_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigError(f"`{name}['schema_version']` must be a non-negative int, got {version!r}.")
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"`{name}` has `schema_version` {version}, newer than this version of peft_lalora reads "
            f"({SCHEMA_VERSION}). Upgrade peft_lalora to read it."
        )
    return version


def build_report(fields: dict) -> PrivacyReport:
    """A writer's report: `fields` (as assembled) checked against the current schema."""
    return PrivacyReport.from_dict({**fields, "schema_version": SCHEMA_VERSION})


def _upgrade_v0(data: dict) -> dict:
    clients = data.get("clients") or []
    epsilon = max((c["epsilon"] for c in clients if isinstance(c, dict) and "epsilon" in c), default=None)
    data.setdefault("epsilon", epsilon)
    data.setdefault("dp", True)
    data.setdefault("unit", REPORT_UNIT)
    data["clients"] = clients
    if data["dp"] is False:  # a non-private run: no guarantee to state
        for key in GUARANTEE_KEYS:
            data.setdefault(key, None)
    return data


def _require(data, keys, name: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"`{name}` must be a dict, got {type(data).__name__}.")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConfigError(
            f"`{name}` must hold {missing}; got keys {sorted(data)}. Pass the report written by the privacy "
            "accountant (privacy_report.json), or None for a non-private run."
        )
