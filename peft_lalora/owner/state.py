"""A SuperNode's private state, on its own disk (`node_config["state-dir"]`, created with mode 0700):

    ledger.json   the client's privacy ledger: every local step ever charged to this data, with the budget
    secret.json   the secret root of the noise and the Poisson batches of each run (never leaves the machine)

Every release draws its noise and batches from its own key, `release_seed(root, n)`: n is the number of charges
ever written to the ledger (the release's own charge included), so a key never repeats on a node, and a round the
server sends twice (e.g. with two different global adapters, to subtract the replies) gets fresh noise and a
second charge.

Both files are written atomically under an exclusive lock (two runs on one node cannot lose a charge). The ledger
is charged and written before the client trains, so an update never leaves without its charge on disk; a restart,
or a second run on the same state folder, continues the same ledger, so a client cannot spend its budget twice.
The budget only shrinks: the ledger keeps the smallest `target_epsilon` it was ever opened with (a run's target,
or the node's `max-epsilon`); a round it cannot afford is refused, not trained, and so is a run that accounts with
another unit, delta or accountant.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import time
from dataclasses import replace
from typing import Optional

from ..errors import ConfigError
from ..federated.seeding import secret_seed
from ..federated.state_io import load_json, save_json
from ..privacy.accounting import PrivacyLedger

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one run per node at a time
    fcntl = None

logger = logging.getLogger(__name__)

LEDGER_FILE, SECRET_FILE, LOCK_FILE = "ledger.json", "secret.json", ".lock"
# the formats keep their first module's name: ledgers written before the move stay readable
_LEDGER_FORMAT, _SECRET_FORMAT, _VERSION = "peft_lalora.flower.ClientLedger", "peft_lalora.flower.ClientSecrets", 1
_PLANNED = (("delta", "target-delta"), ("accountant", "accountant"))  # the saved ledger's key, the run-config key


def release_seed(root: str, release: int) -> str:
    """HMAC-SHA256(root, "release:<n>") in hex: without the root, no two releases' keys are related."""
    return hmac.new(bytes.fromhex(root), f"release:{int(release)}".encode(), hashlib.sha256).hexdigest()


def _smallest(*budgets) -> Optional[float]:
    return min((float(b) for b in budgets if b is not None), default=None)


class ClientState:
    """The private state folder of one SuperNode (one client's data)."""

    def __init__(self, directory: str):
        if not isinstance(directory, str) or not directory:
            raise ConfigError(
                f"`state-dir` (node_config) must be a folder path on the SuperNode's disk, got "
                f"{directory!r}. Start the SuperNode with --node-config 'state-dir=\"/srv/lalora\" ...'."
            )
        self.directory = os.path.abspath(os.path.expanduser(directory))
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)

    @property
    def ledger_path(self) -> str:
        return os.path.join(self.directory, LEDGER_FILE)

    @contextlib.contextmanager
    def locked(self):
        """Hold the folder's exclusive lock (read-modify-write of the ledger and the secrets)."""
        fd = os.open(os.path.join(self.directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield self
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # ----- the ledger -------------------------------------------------------------------------------------------
    def saved(self) -> Optional[dict]:
        """The ledger file's content, or None before the first charge."""
        return load_json(self.ledger_path) if os.path.isfile(self.ledger_path) else None

    def ledger(
        self, plan, client: int, max_epsilon: Optional[float] = None, privacy_unit: str = "example"
    ) -> PrivacyLedger:
        """This run's ledger for `client`: the run's sigma and rate (from `plan`, a `PrivacyPlan` for this client
        alone) on top of every step already charged to this state folder, with the smallest budget seen. A ledger
        counts one privacy unit (`privacy_unit`: "example" or "user"): steps of the other are refused, since an
        epsilon per example does not bound a user's loss, nor the converse sum one unit."""
        rate = plan.sample_rates[client]
        saved = self.saved()
        if saved is None:
            return replace(
                plan, sample_rates={client: rate}, target_epsilon=_smallest(plan.target_epsilon, max_epsilon)
            ).new_ledger()
        if saved.get("format") != _LEDGER_FORMAT or saved.get("version") != _VERSION:
            raise ConfigError(
                f"{self.ledger_path!r} is not a peft_lalora client ledger (format {_LEDGER_FORMAT!r}, "
                f"version {_VERSION}); refusing to train rather than forget what was spent."
            )
        settings = (("privacy-unit", saved.get("privacy-unit", "example"), privacy_unit, "units"),)
        settings += tuple((key, saved[name], getattr(plan, name), "settings") for name, key in _PLANNED)
        for key, kept, asked, what in settings:
            if kept != asked:
                raise ConfigError(
                    f"This node's ledger ({self.ledger_path}) accounts with `{key}`={kept!r}, but the run asks for "
                    f"{asked!r}: epsilons of different {what} do not compose. Run with `{key}`={kept!r}, or keep "
                    "another `state-dir`'s ledger for it."
                )
        state = dict(saved["ledger"])
        histories = list(state["histories"].values())
        state.update(
            noise_multiplier=plan.noise_multiplier,
            sample_rates={str(client): rate},
            per_sample_max_grad_norm=plan.per_sample_max_grad_norm,
            target_epsilon=_smallest(saved["target_epsilon"], plan.target_epsilon, max_epsilon),
            histories={str(client): [entry for history in histories for entry in history]},
        )
        return PrivacyLedger.from_state_dict(state)

    def save_charge(
        self,
        ledger: PrivacyLedger,
        *,
        client: int,
        run_id: int,
        round_idx: int,
        steps: int,
        privacy_unit: str = "example",
    ) -> int:
        """Write the ledger after charging `steps` steps of round `round_idx` of run `run_id` (durable on return);
        returns the release number: how many charges this ledger holds, this one included (call under `locked`)."""
        saved = self.saved() or {"charges": []}
        saved.update(
            format=_LEDGER_FORMAT,
            version=_VERSION,
            client=int(client),
            ledger=ledger.state_dict(),
            target_epsilon=ledger.target_epsilon,
            delta=ledger.delta,
            accountant=ledger.accountant,
        )
        saved["privacy-unit"] = privacy_unit
        release = len(saved["charges"]) + 1
        saved["charges"].append(
            {
                "release": release,
                "run_id": int(run_id),
                "round": int(round_idx),
                "steps": int(steps),
                "epsilon": ledger.epsilon(client),
                "time": time.time(),
            }
        )
        save_json(self.ledger_path, saved)
        return release

    def epsilon(self) -> float:
        """The epsilon spent on this data so far (0 before the first charge), from the file alone."""
        saved = self.saved()
        return 0.0 if saved is None else PrivacyLedger.from_state_dict(saved["ledger"]).max_epsilon()

    # ----- the secret randomness ----------------------------------------------------------------------------
    def private_seed(self, run_id: int) -> str:
        """Run `run_id`'s secret root: drawn from the OS the first time, then read back (a restarted node
        continues the run with it; another run gets a fresh one, even if the ledger file were reset)."""
        path = os.path.join(self.directory, SECRET_FILE)
        saved = load_json(path) if os.path.isfile(path) else {"format": _SECRET_FORMAT, "runs": {}}
        key = str(int(run_id))
        if key not in saved["runs"]:
            saved["runs"][key] = secret_seed()
            save_json(path, saved, mode=0o600)
        return saved["runs"][key]
