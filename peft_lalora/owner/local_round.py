"""One client's local round, whoever asks for it (a Flower ClientApp in its trial mode, or the data owner's private
trainer): check the run against the node's privacy policy (`NodePolicy`), load the data (`TrainingTask`), plan the
client's own privacy (sigma for its own size and the run's target), charge the round on the node's own disk before
training (`ClientState`), run the library's client update with noise keyed by that charge's release number, and
return only what it trained, or a refusal with a code of `peft_lalora_relay.codes`. Flower-free.

Node config: `partition-id` (the client's id in the public schedule), `state-dir` (the private state folder: ledger
and secret randomness), `share-training-metrics` (true: also release the loss and the sampled / dropped counts,
which are computed from the data without noise and so are outside the DP guarantee; a non-private run always
releases them), the policy keys of `policy`, plus whatever the task reads (e.g. `data-path`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from peft_lalora_relay import codes

from ..errors import ConfigError, PolicyError, PrivacyBudgetExceededError
from ..federated.client import ClientShard, model_columns
from ..federated.client_update import LocalConfig, client_update, load_state, stepper_from_args
from ..federated.disclosure import error_text
from ..federated.preflight import preflight
from ..federated.seeding import calibration_steps, scheduled_per_round, select_clients
from ..privacy.plan import PrivacyPlan
from ..tuner.roles import adapter_tensor_names
from .policy import NodePolicy
from .run_config import federated_args
from .state import ClientState, release_seed
from .task import TrainingTask

logger = logging.getLogger(__name__)
_JOBS: OrderedDict = OrderedDict()  # (task, run, node, configs) -> Job: a process that serves several rounds keeps
_MAX_JOBS = 8  # its model (the private trainer; a Flower process that serves several messages)
SHARE = "`share-training-metrics=true` in the node config"


@dataclass
class Job:
    args: Any
    client: int
    model: Any
    shard: ClientShard
    stepper: Any
    plan: Optional[PrivacyPlan]
    local: LocalConfig
    policy: NodePolicy
    checked: bool = False  # the pre-flight check of the data ran


@dataclass
class Reply:
    """What a local round releases: `delta`, `metrics`, `privacy`; or a refusal (`code` of `codes`, `text`)."""

    delta: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    privacy: dict = field(default_factory=dict)
    code: Optional[int] = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.code is None


def partition_id(node_config) -> int:
    """The client id of a node (`node_config["partition-id"]`), which the public schedule selects."""
    value = node_config.get("partition-id")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"`partition-id` (node_config) must be an integer >= 0, the client's id in the public "
            f"schedule, got {value!r}. Start the SuperNode (or the private trainer) with 'partition-id=0 ...'."
        )
    return value


def local_round(
    task: TrainingTask,
    *,
    run_id: int,
    node_id: int,
    run_config: dict,
    node_config: dict,
    round_idx: int,
    lr: float,
    steps: int,
    global_state: dict,
    max_models: int = _MAX_JOBS,
) -> Reply:
    """One round of this client: charge (durably), train, return the delta; or a refusal (nothing charged, except
    `codes.UPDATE_FAILED`, which comes after the charge)."""
    # the node's owner shares values computed from its data without noise; a non-private run's values are not
    # covered anyway, but its error texts follow the same switch
    reveal = node_config.get("share-training-metrics") is True
    try:
        job = open_job(task, run_id, node_id, run_config, node_config, max_models)
        if steps != job.args.local_steps:
            raise ConfigError(
                f"The server asks for `local-steps`={steps}, but the run's config (and this client's "
                f"privacy plan) has {job.args.local_steps}."
            )
        check_scheduled(job, round_idx)
        global_state = checked_global_state(job, global_state)
        if not job.checked:  # the data check (no random draw, nothing charged): raises for this only client
            load_state(job.model, global_state)
            preflight(job.model, [job.shard], job.stepper, round_idx)
            job.checked = True
        ledger, seed = _charge(job, node_config, run_id, round_idx, steps)
    except PrivacyBudgetExceededError as exc:
        logger.warning("round %s refused: %s", round_idx, exc)
        return Reply(code=codes.BUDGET_EXCEEDED, text=str(exc))
    except PolicyError as exc:
        logger.warning("round %s refused by this node's policy: %s", round_idx, exc)
        return Reply(code=codes.POLICY, text=str(exc))
    except Exception as exc:  # noqa: BLE001 - reported to the caller, never a crash of the node
        logger.exception("client configuration failed")  # the full text stays in the node owner's own log
        text = error_text(exc, reveal=reveal, where="while the client prepared the round", opt_in=SHARE)
        return Reply(code=codes.CLIENT_CONFIG, text=text)
    try:  # charged: a failure from here on keeps the charge (the update may have been partly computed)
        job.model.train()
        start = time.perf_counter()
        update = client_update(
            model=job.model,
            stepper=job.stepper,
            shard=job.shard,
            global_state=global_state,
            round_idx=round_idx,
            client=job.client,
            lr=lr,
            local=job.local,
            private_seed=seed,
            adapter_name=job.model.active_adapter,
        )
        seconds = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001
        logger.exception("client update failed")  # the full text stays in the node owner's own log
        text = error_text(exc, reveal=reveal, where="inside the client's local round", opt_in=SHARE)
        return Reply(code=codes.UPDATE_FAILED, text=text)
    delta = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in update.delta.items()}
    epsilon = ledger.epsilon(job.client) if ledger is not None else float("inf")
    metrics = {
        "num-examples": int(update.num_examples),
        "steps": int(update.steps),
        "epsilon": float(epsilon),
        "train-seconds": float(seconds),
    }
    if reveal or not job.args.dp:
        # loss and dropped examples are computed from the data without noise: only the node's owner may share them
        shared = {"loss": float(update.loss), "sampled": int(update.sampled), "dropped": int(update.dropped)}
        metrics.update(shared)
        logger.info("round %d: client %d loss %.4f, %d sampled, %d dropped", round_idx, job.client, *shared.values())
    logger.info("round %d: client %d releases %d tensors, epsilon %.4f", round_idx, job.client, len(delta), epsilon)
    return Reply(delta=delta, metrics=metrics, privacy=privacy_record(job, ledger))


def privacy_record(job: Job, ledger) -> dict:
    """The client's accounting as the server reports it (its epsilon is over every step on this data)."""
    record = {
        "partition-id": job.client,
        "dp": bool(job.args.dp),
        "secret-randomness": bool(job.args.dp and job.args.noise_seed is None),
        "privacy-unit": job.args.privacy_unit,
    }
    if job.shard.users is not None:
        record["users"] = len(job.shard.users)
    if ledger is not None:
        record.update(
            {
                "epsilon": float(ledger.epsilon(job.client)),
                "delta": float(ledger.delta),
                "noise-multiplier": float(ledger.noise_multiplier),
                "sigma-calibration": job.plan.calibration,
                "per-sample-max-grad-norm": float(ledger.per_sample_max_grad_norm),
                "sample-rate": float(ledger.sample_rate(job.client)),
                "steps": int(ledger.steps(job.client)),
                "accountant": ledger.accountant,
            }
        )
        if ledger.target_epsilon is not None:
            record["budget"] = float(ledger.target_epsilon)
    return record


def open_job(
    task: TrainingTask, run_id: int, node_id: int, run_config: dict, node_config: dict, max_models: int = _MAX_JOBS
) -> Job:
    """The client of run `run_id` on this node: its model, data, plan and stepper, built once and kept (at most
    `max_models` jobs, the least recently used one dropped first; a dropped job is rebuilt if asked again)."""
    key = (id(task), run_id, node_id, repr(sorted(run_config.items())), repr(sorted(node_config.items())))
    if key in _JOBS:
        _JOBS.move_to_end(key)
        return _JOBS[key]
    args = federated_args(run_config, task.config_keys)
    policy = NodePolicy.from_node_config(node_config)
    logger.info("this node's privacy policy: %s", policy.as_node_config())
    policy.check(args)  # before this node loads its model or its data
    client = partition_id(node_config)
    if client >= args.num_clients:
        raise ConfigError(f"`partition-id` {client} must be < `num-clients` = {args.num_clients} of the run.")
    while len(_JOBS) >= max_models:  # drop before building: at most `max_models` models in memory at once
        _JOBS.popitem(last=False)
    model = task.model(run_config, node_config)
    dataset, collate = task.client_data(node_config, run_config)
    device = next(model.parameters()).device
    shard = ClientShard(dataset, collate, model_columns(model), device, user_column=args.user_column)
    plan = None
    if args.dp:  # this client plans for itself alone: its size (examples or users), and its own scheduled steps
        units = {client: shard.num_units}
        plan = PrivacyPlan.from_args(args, units, scheduled_steps=calibration_steps(args, [client]))
        policy.check_plan(plan, shard.num_units)
    stepper = stepper_from_args(model, args, plan.noise_multiplier if plan else 0.0, adapter_name=model.active_adapter)
    job = Job(args, client, model, shard, stepper, plan, LocalConfig.from_args(args), policy)
    _JOBS[key] = job
    return job


def check_scheduled(job: Job, round_idx: int) -> None:
    """A client trains only in the rounds the public schedule gives it (its sigma may be calibrated for those)."""
    args = job.args
    if not 0 <= round_idx < args.num_rounds:
        raise ConfigError(
            f"The server asks for round {round_idx}, outside the run's `num-rounds` = {args.num_rounds}."
        )
    if job.client not in select_clients(args.seed, round_idx, args.num_clients, scheduled_per_round(args)):
        raise ConfigError(
            f"Client {job.client} is not among round {round_idx}'s clients in the public schedule "
            f"(seed {args.seed}): refusing to train in it."
        )


def checked_global_state(job: Job, state: dict) -> dict:
    """The server's adapter tensors, checked against this client's model and cast to its parameters."""
    params = dict(job.model.named_parameters())
    expected = adapter_tensor_names(job.model, job.model.active_adapter)
    if sorted(state) != sorted(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ConfigError(
            f"The server's adapter does not match this client's model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}. Server and clients must build the same model and LALoraConfig."
        )
    out = {}
    for name, value in state.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise ConfigError(
                f"`{name}` has shape {tuple(value.shape)} on the server and {tuple(params[name].shape)} "
                "here: server and clients must share one LALoraConfig (r, target modules)."
            )
        out[name] = value.to(params[name].device, params[name].dtype)
    return out


def _charge(job: Job, node_config: dict, run_id: int, round_idx: int, steps: int) -> tuple:
    """Charge the round to the ledger on disk before training; returns (ledger or None, the release's private seed:
    `state.release_seed`, or a fixed `noise-seed` as is where the node allows it: no guarantee, replayed or not)."""
    args = job.args
    if not args.dp:
        return None, args.seed  # the non-private baseline: no ledger, public randomness (as in the trainer)
    state = ClientState(node_config.get("state-dir"))
    with state.locked():
        root = state.private_seed(run_id) if args.noise_seed is None else None
        unit = args.privacy_unit
        ledger = state.ledger(job.plan, job.client, max_epsilon=job.policy.max_epsilon, privacy_unit=unit)
        ledger.charge(job.client, steps)  # raises PrivacyBudgetExceededError: nothing charged or trained
        release = state.save_charge(
            ledger, client=job.client, run_id=run_id, round_idx=round_idx, steps=steps, privacy_unit=unit
        )
    seed = args.noise_seed if root is None else release_seed(root, release)
    return ledger, seed  # the last step that can fail before training is the durable charge
