"""Privacy spent by an earlier run: the adapter a run starts from may have been trained, under DP, on the same data.

Epsilons do not add under RDP accounting: the sound total composes the earlier run's accountant events (sigma, q,
steps) with the new run's, in the new run's ledger. The earlier events come from its `privacy_report.json`: a client
entry's `history` (a composed report writes one), else the (noise_multiplier, sample_rate, steps) of a single-sigma
run; a report without them cannot be composed and is refused. Which events go to which client of the new run:
- "per_client": same client ids and same public partition (`partition`: clients, seed, Dirichlet alpha, minimum
  shard size, label column), so with the same data client k holds the same examples and continues its history.
- "worst_case": otherwise (other clients or partition, data given per client, an older report without
  `partition`) an example of client k may have been held by any earlier client, so every new client starts from a
  history that dominates every earlier client's: per sigma, the largest q and the most steps of any earlier client
  (the RDP of a subsampled Gaussian step grows with q and adds over steps). Exact when one earlier client had both.
Without the user's declaration that the data is the same (`prior_privacy_same_data`), nothing is composed: the
report, the card and a `LALoraWarning` say that the earlier epsilon is NOT included.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from ..errors import ConfigError, LALoraWarning
from .accounting import PrivacyLedger, _epsilon_of_history, _history_entry
from .report import check_schema_version

REPORT_FILE = "privacy_report.json"
_ARG = "prior_privacy_report"


@dataclass(frozen=True)
class PriorSpending:
    """An earlier run's privacy report, as far as composition needs it."""

    source: str  # the report's folder name or Hub repo (never a full local path: the report is published)
    sha256: Optional[str] = None  # of the report file, to identify it exactly; None: not checked
    dp: bool = True  # False for a non-private run (epsilon = inf, nothing to compose)
    epsilon: Optional[float] = None  # as the earlier report states it
    delta: Optional[float] = None
    secret_randomness: bool = True  # False when the earlier noise came from a fixed `noise_seed`
    histories: Optional[dict] = None  # each earlier client's events [(sigma, q, steps)], or None
    missing: Optional[str] = None  # why the histories cannot be rebuilt
    partition: Optional[dict] = None  # the earlier run's public partition record
    privacy_unit: str = "example"  # what the earlier epsilon protects, "example" or "user" (`privacy.users`)

    @property
    def checked(self) -> bool:
        return self.sha256 is not None


# ----------------------------------------------------------------------------------------------- finding it
def read_prior_report(value) -> PriorSpending:
    """The earlier report at `value`: a privacy_report.json, or an adapter folder holding one."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(
            f"`{_ARG}` must be a path to an earlier run's {REPORT_FILE} or its adapter folder, got {value!r}."
        )
    path = os.fspath(value)
    if os.path.isdir(path):
        path = os.path.join(path, REPORT_FILE)
    try:
        raw = Path(path).read_bytes()
        report = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"`{_ARG}` = {value!r}: {path!r} does not exist. Pass the earlier run's {REPORT_FILE} (or the adapter "
            "folder it was saved in)."
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            f"`{_ARG}` = {value!r}: {path!r} is not a readable JSON privacy report ({exc}). Pass the "
            f"{REPORT_FILE} that the earlier run wrote."
        ) from None
    if not isinstance(report, dict) or "epsilon" not in report:
        raise ConfigError(
            f"`{_ARG}` = {value!r}: {path!r} holds no privacy report (no `epsilon`). Pass the {REPORT_FILE} that "
            "the earlier run wrote."
        )
    # A newer schema is refused (an older one, without `schema_version`, is read as ever); `_spending` reads the
    # keys it needs leniently: a report without clients still gives epsilon.
    check_schema_version(report, _ARG)
    source = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    return _spending(report, source, hashlib.sha256(raw).hexdigest())


def detect_prior(adapter_config) -> Optional[PriorSpending]:
    """The report next to the adapter the model was loaded from (`LALoraConfig.adapter_source`, set by
    `PeftModel.from_pretrained`), offline: a local folder, or a Hub adapter's cached snapshot. A Hub adapter whose
    report is not cached gives an unchecked `PriorSpending` (said so, never fetched). None: a new adapter, or a
    folder without a report (trained by something else)."""
    source = getattr(adapter_config, "adapter_source", None)
    if not isinstance(source, dict):
        return None
    folder = source.get("folder")
    if folder and os.path.isfile(os.path.join(folder, REPORT_FILE)):
        prior = read_prior_report(folder)
        return prior if "hub_repo" not in source else replace(prior, source=source["hub_repo"])
    if source.get("hub_repo"):
        return PriorSpending(source=source["hub_repo"], epsilon=None)
    return None


def _spending(report: dict, source: str, sha256: str) -> PriorSpending:
    if report.get("dp") is False or not (report.get("noise_multiplier") or 0) > 0:
        return PriorSpending(source=source, sha256=sha256, dp=False, epsilon=math.inf)
    histories, missing = _histories(report)
    return PriorSpending(
        source=source,
        sha256=sha256,
        epsilon=float(report["epsilon"]),
        delta=report.get("delta"),
        secret_randomness=report.get("secret_randomness") is not False,
        histories=histories,
        missing=missing,
        partition=report.get("partition"),
        privacy_unit=report.get("privacy_unit") or "example",  # reports before user-level DP: examples
    )


def _histories(report: dict) -> tuple[Optional[dict], Optional[str]]:
    clients = report.get("clients")
    if not isinstance(clients, list) or not clients:
        return None, "it has no per-client entries (`clients`)"
    composed = bool((report.get("earlier_spending") or {}).get("included"))
    histories = {}
    try:
        for entry in clients:
            if "history" in entry:
                events = [_history_entry(e) for e in entry["history"]]
            elif composed:  # steps and epsilon include an earlier run whose events the entry does not hold
                return None, f"client {entry.get('client')!r} composes an earlier run but holds no `history`"
            else:
                events = [_history_entry([report["noise_multiplier"], entry["sample_rate"], entry["steps"]])]
            histories[int(entry["client"])] = [e for e in events if e[2] > 0]  # a client never sampled
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        return None, f"a client entry lacks its sample rate, steps or history ({type(exc).__name__}: {exc})"
    return histories, None


# ----------------------------------------------------------------------------------------------- composing
def prior_histories(prior: PriorSpending, clients, partition: dict) -> tuple[dict, str]:
    """({new client: earlier events}, "per_client" or "worst_case"); see the module's docstring."""
    if not prior.checked:
        raise ConfigError(
            f"`prior_privacy_same_data`=True, but the earlier report of the Hub adapter {prior.source!r} is not in "
            f"the local cache (detection is offline). Download its {REPORT_FILE} and pass it as `{_ARG}`."
        )
    if not prior.dp:
        raise ConfigError(
            f"`prior_privacy_same_data`=True, but the earlier run ({prior.source}) was not private (epsilon = inf): "
            "on the same data no finite epsilon holds after it, so there is nothing to compose. Train from an "
            "adapter trained with DP (or a new one), or set `prior_privacy_same_data=False` if the data differs."
        )
    if prior.histories is None:
        raise ConfigError(
            f"`prior_privacy_same_data`=True, but the earlier report ({prior.source}) cannot be composed: "
            f"{prior.missing}. Composition needs each earlier client's (noise_multiplier, sample_rate, steps). Pass "
            f"the {REPORT_FILE} written by peft_lalora for that run, or set `prior_privacy_same_data=False` (the "
            "report then says the earlier spending is not included)."
        )
    clients = sorted(clients)
    same = partition.get("given_per_client") is not True and prior.partition == partition
    if same and sorted(prior.histories) == clients:
        return {c: list(prior.histories[c]) for c in clients}, "per_client"
    worst = dominating_history(prior.histories.values())
    return {c: list(worst) for c in clients}, "worst_case"


def dominating_history(histories) -> list:
    """One history whose RDP is at least every given history's at every order: per sigma, the largest q and the
    largest total of steps."""
    q_max, n_max = {}, {}
    for history in histories:
        steps = {}
        for sigma, q, n in history:
            q_max[sigma] = max(q_max.get(sigma, 0.0), q)
            steps[sigma] = steps.get(sigma, 0) + n
        for sigma, n in steps.items():
            n_max[sigma] = max(n_max.get(sigma, 0), n)
    return [(sigma, q_max[sigma], n) for sigma, n in n_max.items() if n > 0]


def check_room(ledger: PrivacyLedger, scheduled_steps: dict) -> None:
    """Refuse before training when the earlier spending plus each client's scheduled steps exceed the target."""
    target = ledger.target_epsilon
    if target is None:
        return
    for client, steps in sorted(scheduled_steps.items()):
        history = list(ledger.state_dict()["histories"][str(client)])
        history.append((ledger.noise_multiplier, ledger.sample_rate(client), steps))
        eps = _epsilon_of_history(history, ledger.delta, ledger.accountant)
        if eps > target:
            raise ConfigError(
                f"`target_epsilon` = {target} cannot be met with the earlier run's spending composed "
                f"(`prior_privacy_same_data`=True): client {client} would reach epsilon {eps:.4f} after its "
                f"{steps} scheduled steps at sigma={ledger.noise_multiplier:.4g} (it starts at "
                f"{ledger.epsilon(client):.4f}). Raise `target_epsilon`, give `noise_multiplier` (epsilon is "
                "then reported), or train fewer rounds."
            )


# ----------------------------------------------------------------------------------------------- saying it
def not_included_message(prior: PriorSpending) -> str:
    if not prior.checked:
        return (
            f"This run starts from the Hub adapter {prior.source!r}, whose {REPORT_FILE} is not in the local cache "
            "and was not checked (detection is offline): any earlier privacy spending is NOT included in this "
            f"run's epsilon. Download that {REPORT_FILE} and pass it as `{_ARG}`."
        )
    if not prior.dp:
        return (
            f"This run starts from an adapter ({prior.source}) trained WITHOUT differential privacy: the data that "
            "run used has no guarantee, and this run's epsilon does NOT cover it."
        )
    return (
        f"This run starts from an adapter ({prior.source}) whose earlier training spent epsilon = "
        f"{prior.epsilon:.4g} (delta = {prior.delta}); that spending is NOT included in this run's epsilon. If this "
        "run uses the same data, set `prior_privacy_same_data=True` to compose both runs."
    )


# ----------------------------------------------------------------------------------------------- the trainer's use
@dataclass(frozen=True)
class PriorUse:
    """What a run does with the earlier spending: `composition` None (not included) or how it was composed, with
    each new client's starting events."""

    prior: PriorSpending
    composition: Optional[str] = None
    histories: Optional[dict] = None

    def steps(self) -> Optional[dict]:
        """Each client's earlier steps in the ledger (None when nothing was composed)."""
        if self.histories is None:
            return None
        return {c: sum(n for _, _, n in h) for c, h in self.histories.items()}


def partition_record(args, given_per_client: bool) -> dict:
    """The public arguments that fix the split of the same data into clients (published in the report)."""
    if given_per_client:
        return {"num_clients": args.num_clients, "given_per_client": True}
    return {
        "num_clients": args.num_clients,
        "seed": args.seed,
        "dirichlet_alpha": args.dirichlet_alpha,
        "min_shard_size": args.min_shard_size or args.per_device_train_batch_size,
        "label_column": args.label_column,
    }


def apply_prior(
    args, adapter_config, ledger: PrivacyLedger, partition: dict, scheduled_steps: dict
) -> tuple[PrivacyLedger, Optional[PriorUse]]:
    """The ledger this run starts from, and the earlier spending it found (`args.prior_privacy_report`, else the
    report next to the loaded adapter): composed when `args.prior_privacy_same_data`, else warned about."""
    given = args.prior_privacy_report
    prior = read_prior_report(given) if given is not None else detect_prior(adapter_config)
    if prior is None:
        if args.prior_privacy_same_data:
            raise ConfigError(
                "`prior_privacy_same_data`=True, but no earlier privacy report was found: the model was not loaded "
                f"from an adapter folder holding {REPORT_FILE}. Pass it as `{_ARG}`, or drop "
                "`prior_privacy_same_data`."
            )
        return ledger, None
    if not args.prior_privacy_same_data:
        warnings.warn(not_included_message(prior), LALoraWarning, stacklevel=2)
        return ledger, PriorUse(prior)
    if prior.dp and prior.privacy_unit != args.privacy_unit:
        raise ConfigError(
            f"`prior_privacy_same_data`=True composes the earlier run's spending, but it protected "
            f"`privacy_unit`={prior.privacy_unit!r} and this run protects {args.privacy_unit!r}: epsilons of two "
            f"units do not compose. Train with `privacy_unit`={prior.privacy_unit!r}, or drop "
            "`prior_privacy_same_data` (the report then says the earlier epsilon is NOT included)."
        )
    histories, composition = prior_histories(prior, ledger.clients, partition)
    state = ledger.state_dict()  # the new (empty) ledger, its clients starting from the earlier events
    state["histories"] = {str(c): [list(e) for e in histories[c]] for c in ledger.clients}
    ledger = PrivacyLedger.from_state_dict(state)
    check_room(ledger, scheduled_steps)
    return ledger, PriorUse(prior, composition, histories)


def prior_report_fields(use: PriorUse, ledger: PrivacyLedger, report: dict, worst_case: tuple) -> dict:
    """The fields `use` adds to a DP report: `earlier_spending`; when composed, each client's `history` (so that a
    later run can compose again), the worst case composed (a client in every round after the largest earlier
    spending: `worst_case` = (q, steps)), and a lost guarantee when the earlier noise was fixed."""
    prior = use.prior
    spending = {"included": use.composition is not None, "source": prior.source, "checked": prior.checked}
    if prior.checked:
        spending.update(dp=prior.dp, epsilon=prior.epsilon, delta=prior.delta, sha256=prior.sha256)
        if not prior.secret_randomness:
            spending["secret_randomness"] = False
    if use.composition is None:
        return {"earlier_spending": spending}
    spending["composition"] = use.composition
    histories = ledger.state_dict()["histories"]
    start = dominating_history(use.histories.values()) + [(ledger.noise_multiplier, *worst_case)]
    fields = {
        "earlier_spending": spending,
        "clients": [{**c, "history": histories[str(c["client"])]} for c in report["clients"]],
        "worst_case_epsilon": _epsilon_of_history(start, ledger.delta, ledger.accountant),
    }
    if not use.prior.secret_randomness:
        fields["secret_randomness"] = False
        fields["noise_seed_warning"] = (
            f"The earlier run composed here ({use.prior.source}) used a fixed `noise_seed`: its noise can be "
            "re-created, so the total has NO differential-privacy guarantee."
        )
    return fields
