"""Privacy accounting: epsilon of DP-SGD, noise calibration, and a per-client ledger that refuses over-budget releases.

The unit of privacy is one training example of one client (with `privacy_unit="user"`, all the examples of one
user of one client: users are the Poisson-sampled units and n_k counts them, see `privacy.users`). Each local step
of a client is one Poisson-subsampled Gaussian mechanism (sample rate q_k = B / n_k, noise multiplier sigma),
whichever LoRA factor is active. Epsilons
come from opacus' accountants: RDP (default; Mironov et al. 2019, with the conversion of Balle et al. 2020) or PRV
(Gopi et al. 2021). The GDP accountant is a central-limit approximation that can under-report epsilon, so it is
refused.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import warnings
from numbers import Integral

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from ..atomic import atomic_write_bytes
from ..checks import check_choice, check_int, check_number
from ..errors import ConfigError, LALoraError, LALoraWarning, PrivacyBudgetExceededError

logger = logging.getLogger(__name__)

__all__ = ["ACCOUNTANTS", "PrivacyLedger", "calibrate_noise_multiplier", "compute_epsilon", "default_delta"]

ACCOUNTANTS = ("rdp", "prv")
USEFUL_NOISE_MULTIPLIER = 50.0  # above this sigma the noise drowns any gradient signal: warn
EPSILON_RTOL = 1e-3  # calibration: epsilon within target * (1 - EPSILON_RTOL) and target
_STATE_FORMAT, _STATE_VERSION = "peft_lalora.PrivacyLedger", 1
# A ledger's settings: its keyword arguments besides `sample_rates`, its attributes, and keys of its state
LEDGER_SETTINGS = ("accountant", "noise_multiplier", "delta", "per_sample_max_grad_norm", "target_epsilon")
REPORT_UNIT = "one example of one client"
_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)  # the orders of every epsilon reported (opacus' own)


# ----------------------------------------------------------------------------------------------- validation
def _check_accountant(accountant) -> str:
    if accountant == "gdp":
        raise ConfigError(
            "`accountant` must be one of ('rdp', 'prv'), got 'gdp'. The GDP accountant is a central-limit "
            "approximation that can under-state epsilon, so peft_lalora never uses it for reporting; use 'rdp' "
            "(default) or 'prv' (tighter)."
        )
    check_choice("accountant", accountant, ACCOUNTANTS)
    return accountant


_STEPS_FIX = "Count DP-SGD local steps."
_SIGMA_FIX = "Use sigma > 0 for private training (0 means no noise and infinite epsilon)."
_Q_FIX = "Use q = batch_size / num_examples with batch_size <= num_examples."
_DELTA_FIX = "Use delta < 1 / n for the smallest client, e.g. `default_delta(n)` = min(1e-5, 1/n)."
_TARGET_FIX = "Choose the privacy budget, e.g. target_epsilon=8.0."


def _check_sigma(value) -> float:
    return check_number("noise_multiplier", value, "a finite number >= 0", lambda v: 0.0 <= v < math.inf, _SIGMA_FIX)


def _check_q(value, name: str = "sample_rate") -> float:
    return check_number(name, value, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0, _Q_FIX)


def _check_delta(value, name: str = "delta") -> float:
    return check_number(name, value, "a number in (0, 1)", lambda v: 0.0 < v < 1.0, _DELTA_FIX)


def _check_target(value) -> float:
    return check_number("target_epsilon", value, "a finite number > 0", lambda v: 0.0 < v < math.inf, _TARGET_FIX)


# ----------------------------------------------------------------------------------------------- epsilon
@contextlib.contextmanager
def _large_orders_allowed():
    # opacus warns when the optimal RDP order is the largest one it tries (large sigma); the bound stays valid.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        yield


def _epsilon_of_history(history, delta: float, accountant: str) -> float:
    """Epsilon of a composed history [(sigma, q, steps), ...] under opacus' accountant `accountant`."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not history:
        return 0.0
    if any(s == 0.0 for s, _, _ in history):
        return math.inf
    with _large_orders_allowed():
        if accountant == "rdp":
            # What RDPAccountant.get_privacy_spent computes, with each (sigma, q)'s per-step RDP cached: the RDP of
            # n identical steps is n times that of one, so charging many steps costs O(1).
            rdp = sum(_rdp_per_step(s, q) * n for s, q, n in history)
            return float(opacus_rdp.get_privacy_spent(orders=list(_ORDERS), rdp=rdp, delta=delta)[0])
        acc = PRVAccountant()
        acc.history = history
        return float(acc.get_epsilon(delta=delta))


# A pure function of its arguments: the ledgers' repeated queries of one history share it.
_cached_epsilon = functools.lru_cache(maxsize=4096)(_epsilon_of_history)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sigma: float, q: float):
    """Opacus' RDP of one step at every order, cached: the RDP of n identical steps is n times that of one."""
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(_ORDERS))
    rdp.setflags(write=False)
    return rdp


def compute_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon after `steps` Poisson-subsampled Gaussian steps at rate `sample_rate` and noise `noise_multiplier`.

    Computed by opacus' RDP or PRV accountant. `steps == 0` gives 0.0 (nothing released);
    otherwise `noise_multiplier == 0` gives `math.inf`.
    """
    sigma = _check_sigma(noise_multiplier)
    q = _check_q(sample_rate)
    n = check_int("steps", steps, 0, _STEPS_FIX)
    d = _check_delta(delta)
    acc = _check_accountant(accountant)
    return _epsilon_of_history([(sigma, q, n)], d, acc)


def default_delta(smallest_client_size: int) -> float:
    """delta = min(1e-5, 1 / n) for the smallest client's number of examples n."""
    n = check_int("smallest_client_size", smallest_client_size, 1, "Pass the smallest client's number of examples.")
    return min(1e-5, 1.0 / n)


# ----------------------------------------------------------------------------------------------- calibration
def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate,
    steps,
    accountant: str = "rdp",
    epsilon_tolerance: float | None = None,
) -> float:
    """The smallest sigma (to `epsilon_tolerance`) whose epsilon after `steps` steps at `sample_rate` is within the
    target: for one client (numbers, e.g. the worst case: the largest q in every round) or for every client of a
    schedule (equal-length sequences of q_k and scheduled steps_k).

    The answer is the largest of opacus' `accountants.utils.get_noise_multiplier` over the clients on the Pareto
    front of (q_k, steps_k) (epsilon grows with both), then checked on every client with the ledger's accountant.
    The default tolerance is `EPSILON_RTOL` x target (an absolute 0.01 would over-noise small targets). A sigma
    above `USEFUL_NOISE_MULTIPLIER` is warned about.

    Cost (`benchmarks/calibration_speed.py`, CPU seconds, shared machine): the default job's schedule (3 clients on
    the front) RDP 2.6 s, PRV 14.5 s; one client at q = 0.01-0.1: 0.2-1.3 s, at q = 0.5: 3.6-9.3 s. The custom search
    this replaced (~250 lines) took 0.37 s and 2.6 s on the job, 0.2-0.6 s at q = 0.5: opacus' is kept, as the
    difference is paid once per run (a Flower node: for itself alone), before a training of minutes.

    Raises:
        ConfigError: on invalid arguments, or when even sigma = 1e6 cannot meet the target (the message gives the
            smallest feasible epsilon; under RDP it is about log(1/delta) / (max_order - 1) for any q and steps).
        LALoraError: if a client's epsilon at the answer exceeds the target (never seen: the check that keeps it so).
    """
    target = _check_target(target_epsilon)
    delta = _check_delta(target_delta, "target_delta")
    clients = _schedule(sample_rate, steps)
    acc = _check_accountant(accountant)
    if epsilon_tolerance is None:
        epsilon_tolerance = EPSILON_RTOL * target
    tol = check_number(
        "epsilon_tolerance",
        epsilon_tolerance,
        "a number in (0, target_epsilon)",
        lambda v: 0.0 < v < target,
        "Use a small positive tolerance such as 0.001 * target_epsilon.",
    )
    q, n = max(c[0] for c in clients), max(c[1] for c in clients)  # for the messages: a bound on every client

    def solve(pairs) -> float:
        sigmas = [_opacus_sigma(target, delta, q_k, n_k, acc, tol) for q_k, n_k in pairs]
        if None in sigmas:
            floor = _floor(clients, delta, acc)
            raise ConfigError(
                f"`target_epsilon` = {target} cannot be met with delta={delta}, q={q:.6g}, steps={n} under the "
                f"'{acc}' accountant: the smallest feasible epsilon is {floor:.4f} (with infinite noise). "
                f"Use target_epsilon >= {math.ceil(floor * 1000) / 1000:.3f}, a larger delta, or "
                + ("the 'prv' accountant." if acc == "rdp" else "fewer steps.")
            )
        return max(sigmas)

    def over(sigma: float) -> tuple[list, float]:  # the clients above the target at sigma, and the largest epsilon
        eps = {c: _epsilon_of_history([(sigma, *c)], delta, acc) for c in clients}
        return [c for c, e in eps.items() if e > target], max(eps.values())

    front = [c for c in clients if not any(o != c and o[0] >= c[0] and o[1] >= c[1] for o in clients)]
    sigma = solve(front)
    above, eps = over(sigma)
    if above:  # a client off the front above the target (epsilon not monotone here): solve for it too
        sigma = max(sigma, solve(above))
        above, eps = over(sigma)
    if above:
        raise LALoraError(
            f"Noise calibration failed its check: at sigma={sigma:.6g} the clients (q, steps) {above} exceed "
            f"`target_epsilon` = {target} under the '{acc}' accountant. Pass `noise_multiplier` explicitly."
        )
    if sigma > USEFUL_NOISE_MULTIPLIER:
        warnings.warn(
            f"`target_epsilon`={target} is only just above the smallest epsilon this schedule can reach "
            f"({_floor(clients, delta, acc):.4f} with infinite noise; delta={delta}, q={q:.6g}, steps={n}): it "
            f"needs sigma={sigma:.4g}, whose noise drowns any gradient (above {USEFUL_NOISE_MULTIPLIER:g} nothing "
            "useful is learned). Raise `target_epsilon`, or lower the steps or the sample rate.",
            LALoraWarning,
            stacklevel=2,
        )
    logger.info(
        "Calibrated noise_multiplier=%.6g: epsilon=%.4f (target %.4g, delta=%g, q=%.6g, steps=%d, %s)",
        sigma,
        eps,
        target,
        delta,
        q,
        n,
        acc,
    )
    return sigma


# A pure function of its arguments: clients of one size, and a process's repeated calibrations, share one search.
@functools.lru_cache(maxsize=1024)
def _opacus_sigma(target: float, delta: float, q: float, steps: int, acc: str, tol: float) -> float | None:
    """opacus' sigma for one client; None when no sigma up to opacus' `MAX_SIGMA` meets the target. Its bisection has
    no iteration cap: it relies on epsilon being continuous in sigma (RDP: a minimum over orders of continuous
    functions; PRV: measured smooth, 200 sigmas within 0.5 % of the default job's answer changed epsilon by
    0.0011 or less each, monotonically)."""
    with _large_orders_allowed():
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=target,
                    target_delta=delta,
                    sample_rate=q,
                    steps=steps,
                    accountant=acc,
                    epsilon_tolerance=tol,
                )
            )
        except ValueError as error:
            if "budget is too low" in str(error):
                return None
            raise


def _floor(clients: list, delta: float, acc: str) -> float:
    """The smallest epsilon opacus' search reaches (for the messages): epsilon at its `MAX_SIGMA` (under RDP the
    RDP there is ~1e-12, so this is the conversion's floor, whatever q and steps)."""
    return max(_epsilon_of_history([(MAX_SIGMA, q, n)], delta, acc) for q, n in clients)


def _schedule(sample_rate, steps) -> list:
    """The distinct [(q, steps)] of the clients, those with 0 steps left out (they never release anything)."""
    sequence = (list, tuple)
    if isinstance(sample_rate, sequence) or isinstance(steps, sequence):
        if not (
            isinstance(sample_rate, sequence) and isinstance(steps, sequence) and 0 < len(sample_rate) == len(steps)
        ):
            raise ConfigError(
                f"`sample_rate` and `steps` must both be numbers, or sequences of the same length "
                f"(one entry per client), got {sample_rate!r} and {steps!r}."
            )
        pairs = {
            (_check_q(q, f"sample_rate[{i}]"), check_int(f"steps[{i}]", n, 0, _STEPS_FIX))
            for i, (q, n) in enumerate(zip(sample_rate, steps))
        }
        pairs = {p for p in pairs if p[1] > 0}
        if not pairs:
            raise ConfigError("`steps` must schedule at least one local step for some client, got only zeros.")
        return sorted(pairs)
    return [(_check_q(sample_rate), check_int("steps", steps, 1, _STEPS_FIX))]


# ----------------------------------------------------------------------------------------------- ledger
class PrivacyLedger:
    """One opacus accountant per client; one event per local step (whichever LoRA factor is active).

    Args:
        sample_rates (`dict[int, float]`): each client's Poisson rate q_k = batch_size / n_k.
        noise_multiplier (`float`): sigma of every step (>= 0; 0 is non-private and reports epsilon = inf).
        delta (`float`): the delta of every reported epsilon, in (0, 1).
        accountant (`str`): "rdp" (default) or "prv".
        per_sample_max_grad_norm (`float`): the clip norm C (> 0), recorded in the report.
        target_epsilon (`float`, *optional*): the budget; a release that would exceed it is refused.

    The report and state are JSON. A non-private run has epsilon = inf, which is kept as a float and written by
    `json` as the token `Infinity` (`allow_nan=True`; Python's `json.loads` reads it back as inf).
    """

    def __init__(
        self,
        *,
        sample_rates: dict,
        noise_multiplier: float,
        delta: float,
        accountant: str = "rdp",
        per_sample_max_grad_norm: float,
        target_epsilon: float | None = None,
    ):
        if not isinstance(sample_rates, dict) or not sample_rates:
            raise ConfigError(f"`sample_rates` must be a non-empty dict {{client id: q}}, got {sample_rates!r}.")
        self._rates = {}
        for client, q in sample_rates.items():
            if isinstance(client, bool) or not isinstance(client, Integral):
                raise ConfigError(f"`sample_rates` keys must be integer client ids, got {client!r}.")
            self._rates[int(client)] = _check_q(q, f"sample_rates[{client}]")
        self.noise_multiplier = _check_sigma(noise_multiplier)
        self.delta = _check_delta(delta)
        self.accountant = _check_accountant(accountant)
        self.per_sample_max_grad_norm = check_number(
            "per_sample_max_grad_norm",
            per_sample_max_grad_norm,
            "a finite number > 0",
            lambda v: 0.0 < v < math.inf,
            "Use a fixed clip norm such as 1.0 (never computed from data).",
        )
        self.target_epsilon = None if target_epsilon is None else _check_target(target_epsilon)
        if self.noise_multiplier == 0.0:
            if self.target_epsilon is not None:
                raise ConfigError(
                    f"`noise_multiplier` = 0 gives infinite epsilon and can never meet `target_epsilon` = "
                    f"{self.target_epsilon}. Calibrate sigma with `calibrate_noise_multiplier`, or drop the target "
                    "for a non-private run."
                )
            warnings.warn(
                "`noise_multiplier` = 0: training is not private and epsilon is reported as inf.",
                LALoraWarning,
                stacklevel=2,
            )
        self._histories = {c: [] for c in self._rates}

    # -- queries
    @property
    def clients(self) -> tuple:
        return tuple(self._rates)

    def sample_rate(self, client: int) -> float:
        return self._rates[self._client(client)]

    def _client(self, client) -> int:
        if isinstance(client, bool) or not isinstance(client, Integral) or int(client) not in self._rates:
            raise ConfigError(f"`client` must be one of the ledger's clients {sorted(self._rates)}, got {client!r}.")
        return int(client)

    def _epsilon(self, history: list) -> float:
        return _cached_epsilon(tuple(history), self.delta, self.accountant)

    def epsilon(self, client: int) -> float:
        client = self._client(client)
        return self._epsilon(self._histories[client])

    def steps(self, client: int) -> int:
        return sum(n for _, _, n in self._histories[self._client(client)])

    def max_epsilon(self) -> float:
        """The largest epsilon over the clients (the report's "epsilon"), without building the whole report."""
        return max(self._epsilon(h) for h in self._histories.values())

    # -- releases
    def _prospective(self, client: int, steps) -> tuple[list, float]:
        steps = check_int("steps", steps, 0, _STEPS_FIX)
        history, event = list(self._histories[client]), (self.noise_multiplier, self._rates[client])
        if steps and history and history[-1][:2] == event:  # merged into the last entry: O(1) epsilons
            history[-1] = (*event, history[-1][2] + steps)
        elif steps:
            history.append((*event, steps))
        eps = self._epsilon(history)
        if self.target_epsilon is not None and eps > self.target_epsilon:
            raise PrivacyBudgetExceededError(
                f"Release refused for client {client}: {steps} more local step(s) would take its epsilon to "
                f"{eps:.4f} (delta={self.delta:g}), above `target_epsilon` = {self.target_epsilon}. Nothing was "
                f"released or charged (client {client} is at epsilon {self.epsilon(client):.4f} after "
                f"{self.steps(client)} steps). Stop training this client, or calibrate sigma for the whole schedule."
            )
        return history, eps

    def check_release(self, client: int, steps: int) -> None:
        """Raise PrivacyBudgetExceededError if `steps` more steps would take `client` above `target_epsilon`."""
        self._prospective(self._client(client), steps)

    def charge(self, client: int, steps: int = 1) -> float:
        """Check the release, then record `steps` local steps of `client`; returns its new epsilon."""
        client = self._client(client)
        history, eps = self._prospective(client, steps)
        self._histories[client] = history
        return eps

    # -- report and state
    def report(self) -> dict:
        """The privacy report: epsilon per client and the maximum, delta, sigma, C, q, steps, accountant."""
        clients = [
            {"client": c, "epsilon": self.epsilon(c), "sample_rate": q, "steps": self.steps(c)}
            for c, q in self._rates.items()
        ]
        return {
            "epsilon": max(entry["epsilon"] for entry in clients),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "per_sample_max_grad_norm": self.per_sample_max_grad_norm,
            "accountant": self.accountant,
            "unit": REPORT_UNIT,
            "clients": clients,
        }

    def save_report(self, path: str) -> None:
        """Write `report()` as JSON, atomically (temporary file, fsync, rename); inf is written as `Infinity`."""
        atomic_write_bytes(
            os.fspath(path), (json.dumps(self.report(), indent=2, allow_nan=True) + "\n").encode("utf-8")
        )

    def state_dict(self) -> dict:
        """JSON-serialisable full state: settings and every client's accountant history."""
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            **{k: getattr(self, k) for k in LEDGER_SETTINGS},
            "sample_rates": {str(c): q for c, q in self._rates.items()},
            "histories": {str(c): [[s, q, n] for s, q, n in h] for c, h in self._histories.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> PrivacyLedger:
        """Rebuild a ledger from `state_dict()` (also after a JSON round trip); epsilons are identical."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ConfigError(
                f"`state` must be a dict written by `PrivacyLedger.state_dict()` "
                f"(format {_STATE_FORMAT!r}), got {type(state).__name__}."
            )
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"`state['version']` must be {_STATE_VERSION}, got {state.get('version')!r}.")
        missing = [k for k in (*LEDGER_SETTINGS, "sample_rates", "histories") if k not in state]
        if missing:
            raise ConfigError(
                f"`state` lacks the keys {missing}; pass the dict `PrivacyLedger.state_dict()` returned."
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LALoraWarning)  # the sigma == 0 warning was given at creation
            ledger = cls(
                sample_rates={_client_id(k): q for k, q in state["sample_rates"].items()},
                **{k: state[k] for k in LEDGER_SETTINGS},
            )
        histories = state["histories"]
        if not isinstance(histories, dict) or {_client_id(k) for k in histories} != set(ledger._rates):
            raise ConfigError("`state['histories']` must have one entry per client of `state['sample_rates']`.")
        for key, history in histories.items():
            ledger._histories[_client_id(key)] = [_history_entry(e) for e in history]
        return ledger


def _client_id(key) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ConfigError(f"Client ids in a ledger state must be integers, got {key!r}.") from None


def _history_entry(entry) -> tuple:
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        raise ConfigError(f"Accountant history entries must be [noise_multiplier, sample_rate, steps], got {entry!r}.")
    sigma, q, n = entry
    return (_check_sigma(sigma), _check_q(q), check_int("steps", n, 0, _STEPS_FIX))
