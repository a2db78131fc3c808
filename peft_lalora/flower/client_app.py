"""The ClientApp: one SuperNode, one client. It checks the run against its node's privacy policy (`NodePolicy`),
loads its own data (`FlowerTask.load_client_data`), plans its own privacy (sigma for its own size and the run's
target), charges each round on its own disk before training (`ClientState`), runs the library's client update
(`federated.client_update`) with noise keyed by that charge's release number, and sends only what it trained.

Node config (`flower-supernode --node-config '...'`): `partition-id` (the client's id in the public schedule),
`state-dir` (its private state folder: ledger and secret randomness), `share-training-metrics` (true: also send the
loss and the sampled / dropped counts, which are computed from the data without noise and so are outside the DP
guarantee; a non-private run always sends them), plus whatever the task reads (e.g. `data-path`). The data owner's
policy, which a run can only tighten (see `policy`): `max-epsilon` (lifetime cap, default 8.0), `max-delta`
(default 1e-5; never >= 1/n), `min-noise-multiplier` (default: any sigma > 0), `allow-non-private` (may a run set
`dp=false`; default false) and `allow-fixed-noise-seed` (may a run set `noise-seed`; default false). A run that
breaks it gets an error reply with code `protocol.POLICY` naming the key, the value asked and the limit, and the
node logs a warning; nothing is trained or charged.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..errors import ClientDataError, ConfigError, PolicyError, PrivacyBudgetExceededError
from ..federated.client import ClientShard, model_columns
from ..federated.client_update import LocalConfig, client_update, load_state, stepper_from_args
from ..federated.disclosure import error_text
from ..federated.preflight import PROBE_ROWS, preflight
from ..federated.seeding import calibration_steps, select_clients
from ..privacy.plan import PrivacyPlan
from ..tuner.roles import adapter_tensor_names
from . import protocol
from .client_state import ClientState, release_seed
from .policy import NodePolicy
from .settings import federated_args
from .task import FlowerTask

logger = logging.getLogger(__name__)
_JOBS: OrderedDict = OrderedDict()  # (task, run, node) -> _Job: a process that serves several rounds keeps its model
_MAX_JOBS = 8


@dataclass
class _Job:
    args: Any
    client: int
    model: Any
    shard: ClientShard
    stepper: Any
    plan: Optional[PrivacyPlan]
    local: LocalConfig
    policy: NodePolicy
    checked: bool = False  # the pre-flight check of the data ran


def make_client_app(task: FlowerTask) -> ClientApp:
    """A `ClientApp` that answers the server's queries and runs `task`'s client updates."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        try:
            record = ConfigRecord({"partition-id": protocol.partition_id(context.node_config)})
        except ConfigError as exc:
            return Message(Error(protocol.CLIENT_CONFIG, str(exc)), reply_to=message)
        return Message(RecordDict({protocol.NODE: record}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return train_round(task, message, context)

    return app


def train_round(task: FlowerTask, message: Message, context: Context) -> Message:
    """One round of this client: charge (durably), train, reply with the delta; or an error reply."""
    try:
        job = _job(task, context)
        config = message.content[protocol.CONFIG]
        round_idx, lr, steps = int(config["round"]), float(config["learning-rate"]), int(config["local-steps"])
        if steps != job.args.local_steps:
            raise ConfigError(
                f"The server asks for `local-steps`={steps}, but the run's config (and this client's "
                f"privacy plan) has {job.args.local_steps}."
            )
        _check_scheduled(job, round_idx)
        global_state = _global_state(job, message.content[protocol.GLOBAL])
        if not job.checked:  # the data fails here, before any charge
            _preflight(job, global_state, round_idx)
            job.checked = True
        ledger, seed = _charge(job, context, round_idx, steps)
    except PrivacyBudgetExceededError as exc:
        logger.warning("round %s refused: %s", message.content[protocol.CONFIG].get("round"), exc)
        return Message(Error(protocol.BUDGET_EXCEEDED, str(exc)), reply_to=message)
    except PolicyError as exc:
        logger.warning(
            "round %s refused by this node's policy: %s", message.content[protocol.CONFIG].get("round"), exc
        )
        return Message(Error(protocol.POLICY, str(exc)), reply_to=message)
    except Exception as exc:  # noqa: BLE001 - reported to the server, never a crash of the node
        logger.exception("client configuration failed")  # the full text stays in the node owner's own log
        text = error_text(exc, reveal=_reveals(context), where="while the client prepared the round", opt_in=SHARE)
        return Message(Error(protocol.CLIENT_CONFIG, text), reply_to=message)
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
        text = error_text(exc, reveal=_reveals(context), where="inside the client's local round", opt_in=SHARE)
        return Message(Error(protocol.UPDATE_FAILED, text), reply_to=message)
    delta = ArrayRecord({n: t.detach().to("cpu", torch.float32) for n, t in update.delta.items()})
    sent = delta.count_bytes()
    epsilon = ledger.epsilon(job.client) if ledger is not None else float("inf")
    metrics = {
        "num-examples": int(update.num_examples),
        "steps": int(update.steps),
        "epsilon": float(epsilon),
        "bytes-sent": int(sent),
        "train-seconds": float(seconds),
    }
    if _reveals(context) or not job.args.dp:
        # loss and dropped examples are computed from the data without noise: only the node's owner may share them
        metrics.update({"loss": float(update.loss), "sampled": int(update.sampled), "dropped": int(update.dropped)})
        logger.info(
            "round %d: client %d loss %.4f, %d sampled, %d dropped",
            round_idx,
            job.client,
            update.loss,
            update.sampled,
            update.dropped,
        )
    logger.info(
        "round %d: client %d sends %d tensors (%d bytes), epsilon %.4f",
        round_idx,
        job.client,
        len(delta),
        sent,
        epsilon,
    )
    content = RecordDict(
        {protocol.DELTA: delta, protocol.METRICS: MetricRecord(metrics), protocol.PRIVACY: privacy_record(job, ledger)}
    )
    return Message(content, reply_to=message)


SHARE = "`share-training-metrics=true` in the node config"


def _reveals(context: Context) -> bool:
    """The node's owner shares values computed from its data without noise (`share-training-metrics`); a
    non-private run's values are not covered anyway, but its error texts follow the same switch."""
    return context.node_config.get("share-training-metrics") is True


def privacy_record(job: _Job, ledger) -> ConfigRecord:
    """The client's accounting as the server reports it (its epsilon is over every step on this data)."""
    record = {
        "partition-id": job.client,
        "dp": bool(job.args.dp),
        "secret-randomness": bool(job.args.dp and job.args.noise_seed is None),
    }
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
    return ConfigRecord(record)


def _job(task: FlowerTask, context: Context) -> _Job:
    key = (
        id(task),
        context.run_id,
        context.node_id,
        repr(sorted(context.run_config.items())),
        repr(sorted(context.node_config.items())),
    )
    if key in _JOBS:
        return _JOBS[key]
    args = federated_args(context.run_config, task.config_keys)
    policy = NodePolicy.from_node_config(context.node_config)
    logger.info("this node's privacy policy: %s", policy.as_node_config())
    policy.check(args)  # before this node loads its model or its data
    client = protocol.partition_id(context.node_config)
    if client >= args.num_clients:
        raise ConfigError(f"`partition-id` {client} must be < `num-clients` = {args.num_clients} of the run.")
    model = task.model(context.run_config, context.node_config)
    dataset, collate = task.client_data(context.node_config, context.run_config)
    device = next(model.parameters()).device
    shard = ClientShard(dataset, collate, model_columns(model), device)
    plan = None
    if args.dp:  # this client plans for itself alone: its size, and its own steps in the public schedule
        plan = PrivacyPlan.from_args(args, {client: len(shard)}, scheduled_steps=calibration_steps(args, [client]))
        policy.check_plan(plan, len(shard))
    stepper = stepper_from_args(model, args, plan.noise_multiplier if plan else 0.0, adapter_name=model.active_adapter)
    job = _Job(args, client, model, shard, stepper, plan, LocalConfig.from_args(args), policy)
    _JOBS[key] = job
    while len(_JOBS) > _MAX_JOBS:
        _JOBS.popitem(last=False)
    return job


def _check_scheduled(job: _Job, round_idx: int) -> None:
    """A client trains only in the rounds the public schedule gives it (its sigma may be calibrated for those)."""
    args = job.args
    if not 0 <= round_idx < args.num_rounds:
        raise ConfigError(
            f"The server asks for round {round_idx}, outside the run's `num-rounds` = {args.num_rounds}."
        )
    if job.client not in select_clients(args.seed, round_idx, args.num_clients, args.clients_per_round):
        raise ConfigError(
            f"Client {job.client} is not among round {round_idx}'s clients in the public schedule "
            f"(seed {args.seed}): refusing to train in it."
        )


def _global_state(job: _Job, arrays: ArrayRecord) -> dict:
    """The server's adapter tensors, checked against this client's model and cast to its parameters."""
    params = dict(job.model.named_parameters())
    expected = adapter_tensor_names(job.model, job.model.active_adapter)
    state = arrays.to_torch_state_dict()
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


def _preflight(job: _Job, global_state: dict, round_idx: int) -> None:
    """The library's data check on this client's first examples (no random draw, nothing charged)."""
    tuner = job.model.base_model

    def gradient_probe(shard):
        tuner.set_trainable_factors(tuner.trainable_factors(round_idx, 0))
        job.stepper.probe(shard.batch(list(range(min(PROBE_ROWS, len(shard))))))

    load_state(job.model, global_state)
    failing = preflight(job.model, [job.shard], gradient_probe)
    if failing:  # pragma: no cover - preflight raises when its only client fails
        raise ClientDataError(f"client {job.client}'s data fails the pre-flight check")


def _charge(job: _Job, context: Context, round_idx: int, steps: int) -> tuple:
    """Charge the round to the ledger on disk before training; returns (ledger or None, the release's private seed).

    The seed is `release_seed(run root, n)`, n the release number the charge wrote: a round asked twice is charged
    twice and noised twice, independently. A fixed `noise-seed` (only where the node allows it) is used as is, so
    that tests can compare runs; it gives no guarantee, replayed or not."""
    args = job.args
    if not args.dp:
        return None, args.seed  # the non-private baseline: no ledger, public randomness (as in the trainer)
    state = ClientState(context.node_config.get("state-dir"))
    with state.locked():
        root = state.private_seed(context.run_id) if args.noise_seed is None else None
        ledger = state.ledger(job.plan, job.client, max_epsilon=job.policy.max_epsilon)
        ledger.charge(job.client, steps)  # raises PrivacyBudgetExceededError: nothing charged or trained
        release = state.save_charge(ledger, client=job.client, run_id=context.run_id, round_idx=round_idx, steps=steps)
    seed = args.noise_seed if root is None else release_seed(root, release)
    return ledger, seed  # the last step that can fail before training is the durable charge
