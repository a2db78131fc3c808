"""Check a run config before `flwr run`: what the SuperLink would refuse with a bare `[code: 15] Invalid run
configuration.` (an undeclared key: Flower 1.42's `fuse_dicts` names it only in the SuperLink's own log), and what
the ServerApp would refuse (`owner.run_config.federated_args`), each named by key.

    python -m peft_lalora.flower.check_config recipes/flower_app -c 'num-rounds=8 output-dir="/srv/runs/rt"'
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from flwr.common.config import flatten_dict, get_project_config, parse_config_args

from ..errors import ConfigError
from ..owner.run_config import SERVER_KEYS, federated_args, field_of, server_setting

logger = logging.getLogger(__name__)


def check_run_config(app_dir: str, overrides: Sequence[str] = ()) -> dict:
    """The run config `flwr run app_dir -c overrides` would give the ServerApp, checked; raises `ConfigError`."""
    project = get_project_config(app_dir)
    declared = flatten_dict(project["tool"]["flwr"]["app"].get("config", {}))
    given = parse_config_args(list(overrides))
    undeclared = sorted(set(given) - set(declared))
    if undeclared:
        raise ConfigError(
            f"`--run-config` keys {undeclared} are not declared in [tool.flwr.app.config] of {app_dir}/pyproject.toml: "
            "Flower's SuperLink refuses such a run with a bare `[code: 15] Invalid run configuration.` before any "
            f"of the app's code runs. Fix the spelling, or declare the key with a default there (declared: "
            f"{sorted(declared)})."
        )
    config = {**declared, **given}
    federated_args(config, _task_keys(app_dir, project, config))
    for key in SERVER_KEYS:
        server_setting(config, key)
    return config


def _task_keys(app_dir: str, project: dict, config: dict) -> list:
    """The keys the app's `FlowerTask` reads (imported from its ServerApp), or every declared key that is not ours
    when the app cannot be imported here."""
    target = project["tool"]["flwr"]["app"]["components"]["serverapp"]
    module, _, attribute = target.partition(":")
    sys.path.insert(0, app_dir)
    try:
        task = getattr(getattr(importlib.import_module(module), attribute), "lalora_task", None)
    except Exception as exc:  # noqa: BLE001 - the app's code may need what only the server has
        logger.warning("could not import %s (%s): the task's own keys are not checked", target, exc)
        task = None
    finally:
        sys.path.remove(app_dir)
    if task is not None:
        return list(task.config_keys)
    return [k for k in config if field_of(k) is None and k not in SERVER_KEYS]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("app_dir", help="the Flower app folder (its pyproject.toml)")
    parser.add_argument("-c", "--run-config", action="append", default=[], help="as for `flwr run`")
    ns = parser.parse_args(argv)
    try:
        config = check_run_config(ns.app_dir, ns.run_config)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")  # a command's answer, not library logging
        return 2
    sys.stdout.write(f"run config OK ({len(config)} keys)\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
