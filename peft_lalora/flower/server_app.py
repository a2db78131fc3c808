"""The ServerApp: builds the model (for its initial adapter), finds which SuperNode holds which client, runs the
rounds with `LALoraStrategy` and saves what they gave (`save_results`; how a run ends: `outcome`). Its run config
(`[tool.flwr.app.config]`, `flwr run -c key=value`) is read by `owner.run_config`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..errors import ConfigError
from ..federated.client_dp import round_tensor_names
from ..federated.client_update import load_state
from ..federated.output_dir import prepare_output_dir
from ..federated.seeding import secret_seed
from ..federated.state_io import save_json
from ..hub import push_adapter_folder, write_model_card  # hub imports only tuner, privacy and errors
from ..hub.card import FEDERATED_KEYS
from ..owner.run_config import federated_args, server_setting
from ..owner.task import TrainingTask
from ..privacy.prior import REPORT_FILE as PRIVACY_REPORT
from ..tuner.roles import adapter_tensor_names
from ..tuner.saving import save_adapter_files
from .outcome import FlowerRunError, QuorumUnreachable, failure_message, outcome
from .prompt_grid import prompt_grid
from .report import privacy_report
from .strategy import LALoraStrategy

logger = logging.getLogger(__name__)
HISTORY, RUN_CONFIG = "flower_history.json", "run_config.json"
DEFAULT_OUTPUT_DIR = "lalora_flower_output"


def make_server_app(task: TrainingTask) -> ServerApp:
    """A `ServerApp` whose main function runs `task` across the SuperNodes (see `run_federation`)."""
    app = ServerApp()
    app.lalora_task = task  # read by `check_config` to know the task's own run-config keys

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(task, grid, context)

    return app


def run_federation(task: TrainingTask, grid: Grid, context: Context) -> dict:
    """Run the rounds and save the results; returns the privacy report."""
    grid = prompt_grid(grid)  # replies collected as they arrive, not on Flower's 3 s poll
    run_config = dict(context.run_config)
    run_config.setdefault("output-dir", DEFAULT_OUTPUT_DIR)
    args = federated_args(run_config, task.config_keys)
    _check_publishable(args)
    prepare_output_dir(args, resuming=False)  # one run per folder: refused (or cleared) before any round
    Path(args.output_dir, RUN_CONFIG).unlink(missing_ok=True)
    # a run that dies in round 0 leaves "no round finished" on disk, not nothing (peft_lalora.flower.run reads it)
    save_json(os.path.join(args.output_dir, HISTORY), [])
    model = task.model(run_config, context.node_config)
    params = dict(model.named_parameters())
    names = adapter_tensor_names(model, model.active_adapter)
    strategy = LALoraStrategy(
        args=args,
        global_state={n: params[n] for n in names},
        round_timeout=server_setting(run_config, "round-timeout"),
        max_aborted_rounds=server_setting(run_config, "max-aborted-rounds"),
        # after every round: a run killed with its SuperLink leaves the rounds it had on disk
        on_round=lambda history: save_json(os.path.join(args.output_dir, HISTORY), history),
        **client_dp_settings(args, model, names),
    )
    wait = server_setting(run_config, "node-wait-timeout")
    found = strategy.discover(grid, wait=wait, until=args.num_clients)
    if len(found) < args.min_clients_per_round:
        raise ConfigError(
            f"Only {len(found)} of the {args.num_clients} clients (partition-ids {sorted(found)}) have "
            f"a SuperNode after waiting {wait:.0f} s (`node-wait-timeout`), fewer than "
            f"`min-clients-per-round` = {args.min_clients_per_round}. Start more SuperNodes."
        )
    if len(found) < args.num_clients:
        logger.warning(
            "Only partition-ids %s of %d have a SuperNode; the others' rounds count as failed clients.",
            sorted(found),
            args.num_clients,
        )
    error = None
    try:
        strategy.start(
            grid=grid, initial_arrays=strategy.arrays(), num_rounds=args.num_rounds, timeout=strategy.round_timeout
        )
    except Exception as exc:  # noqa: BLE001 - a lost SuperLink or an unreachable quorum: record it, then raise
        error = exc
        strategy.round_lost()
        logger.error("the rounds ended early at round %d: %s: %s", len(strategy.history), type(exc).__name__, exc)
    return save_results(task, model, strategy, run_config, error=error)


def save_results(task: TrainingTask, model, strategy: LALoraStrategy, run_config: dict, *, error=None) -> dict:
    """Privacy report, history and run config (always: what the clients charged, which rounds were lost); the
    adapter (peft format) and card only when a round was aggregated; a push only when the run completed. Raises `FlowerRunError` (the ServerApp exits non-zero) unless the run completed and aggregated."""
    args, out = strategy.args, strategy.args.output_dir
    result = outcome(strategy.history, args.num_rounds, error)
    report = privacy_report(strategy, run=result).to_dict()
    save_json(os.path.join(out, PRIVACY_REPORT), report)
    save_json(os.path.join(out, HISTORY), strategy.history)
    save_json(os.path.join(out, RUN_CONFIG), run_config)
    if result["rounds_aggregated"]:
        _save_adapter(task, model, strategy, run_config, report)
    failure = failure_message(result, out)
    if failure is not None:
        logger.error("%s", failure)
        raise (QuorumUnreachable if isinstance(error, QuorumUnreachable) else FlowerRunError)(failure) from error
    if result["rounds_lost"]:
        lost = sorted(int(r) for r in result["rounds_lost"])
        logger.warning("rounds %s were lost (aborted): see `run` in %s", lost, PRIVACY_REPORT)
    if args.push_to_hub:
        push_adapter_folder(
            out,
            args.hub_model_id,
            token=args.hub_token,
            private=bool(args.hub_private_repo),
            allow_fixed_noise_seed=bool(args.allow_fixed_noise_seed),
        )
    return report


def _save_adapter(task: TrainingTask, model, strategy: LALoraStrategy, run_config: dict, report: dict) -> None:
    """The global adapter after the last aggregated round, the task's extras and the card (the real rounds)."""
    args, out, result = strategy.args, strategy.args.output_dir, report["run"]
    params = dict(model.named_parameters())
    load_state(model, {n: t.to(params[n].device, params[n].dtype) for n, t in strategy.global_state.items()})
    save_adapter_files(model, out, model.active_adapter)  # at the top, whatever the adapter's name
    if task.save_extras is not None:
        task.save_extras(out, run_config)
    config = model.peft_config[model.active_adapter]
    if args.dp and report["epsilon"] is None:  # no epsilon to state: no card
        logger.warning("No client ever reported its epsilon: no model card is written.")
    else:
        write_model_card(
            out,
            base_model=config.base_model_name_or_path or "unknown",
            adapter_config=config.to_dict(),
            privacy_report=report if args.dp or args.client_dp else None,
            metrics={},
            repo_id=args.hub_model_id,
            federated={
                **{k: getattr(args, k) for k in FEDERATED_KEYS},
                "num_rounds": rounds_text(result),
                "partition": "each client's own data on its own SuperNode (Flower)",
            },
        )
    logger.info("saved the adapter, %s and %s to %s (epsilon %s)", PRIVACY_REPORT, HISTORY, out, report["epsilon"])


def rounds_text(result: dict):
    """The card's rounds: the aggregated count, with the configured ones and the lost ones when they differ."""
    aggregated = len(result["rounds_aggregated"])
    if not result["rounds_lost"]:
        return aggregated
    lost = sorted(int(r) for r in result["rounds_lost"])
    return f"{aggregated} aggregated of {result['rounds_configured']} configured (rounds lost: {lost})"


def client_dp_settings(args, model, names: list) -> dict:
    """Client-level DP's server secrets: a fresh private root (the sampling and noise; `noise-seed` fixes it, no
    guarantee then), never stored, and the tensors each round's clients train (the noise covers them)."""
    if not args.client_dp:
        return {}
    config, adapter = model.peft_config[model.active_adapter], model.active_adapter
    return {
        "private_root": args.noise_seed if args.noise_seed is not None else secret_seed(),
        "round_tensors": lambda r: round_tensor_names(config, names, adapter, r, args.local_steps),
    }


def _check_publishable(args) -> None:
    """Refuse, before any round, a push of noise from a fixed seed (`FederatedDPArguments` refuses the rest)."""
    fixed_noise = (args.dp or args.client_dp) and args.noise_seed is not None
    if args.push_to_hub and fixed_noise and not args.allow_fixed_noise_seed:
        raise ConfigError(
            f"`noise-seed`={args.noise_seed} fixes the noise, so the adapter would NOT be differentially "
            "private: refusing to publish it. Leave `noise-seed` out, or set `allow-fixed-noise-seed`."
        )
