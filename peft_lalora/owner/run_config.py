"""A Flower run's settings: the app's `[tool.flwr.app.config]` (plus `flwr run -c` overrides) read as
`FederatedDPArguments`, so that a Flower run and `FederatedDPTrainer` share one definition and one validation.

Keys are the arguments' field names in kebab case (`num-rounds`, `target-epsilon`, ...; `batch-size` is
`per_device_train_batch_size`, each client's expected Poisson batch). TOML has no null: leave a key out for None.
The server reads `round-timeout` and `node-wait-timeout` (seconds) and `max-aborted-rounds` (consecutive aborted
rounds after which the run stops; 0: never) too, and a `FlowerTask` declares its own keys.
Any other key is refused, so that a misspelt privacy setting never falls back to a default silently. The private
trainer reads the run config its caller forwards with the same functions (Flower-free).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterable, Mapping

from ..arguments import FederatedDPArguments
from ..checks import check_int, check_number
from ..errors import ConfigError, LALoraWarning

ALIASES = {"batch-size": "per_device_train_batch_size"}
# FederatedDPArguments fields that mean something in a Flower run (data splits and evaluation are the nodes' own)
FIELDS = (
    "num_clients",
    "clients_per_round",
    "num_rounds",
    "local_steps",
    "min_clients_per_round",
    "aggregation_weights",
    "dp",
    "target_epsilon",
    "target_delta",
    "allow_large_delta",
    "noise_multiplier",
    "per_sample_max_grad_norm",
    "accountant",
    "noise_seed",
    "allow_fixed_noise_seed",
    "seed",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "round_lr_decay",
    "lora_b_lr_ratio",
    "local_optimizer",
    "local_momentum",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "per_sample_grad_backend",
    "bf16",
    "use_cpu",
    "output_dir",
    "overwrite_output_dir",
    "push_to_hub",
    "hub_model_id",
    "hub_private_repo",
    "per_device_train_batch_size",
    "sigma_calibration",
    "per_sample_head_max_grad_norm",
    "aggregation",
    "aggregation_trim",
    "client_dp",
    "client_clip_norm",
    "client_noise_multiplier",
    "client_target_epsilon",
    "client_target_delta",
    "privacy_unit",
    "user_column",
)
SERVER_KEYS = {"round-timeout": 3600.0, "node-wait-timeout": 300.0, "max-aborted-rounds": 2}


def field_of(key: str) -> str | None:
    """The `FederatedDPArguments` field a run-config key sets, or None."""
    name = ALIASES.get(key, key.replace("-", "_"))
    return name if name in FIELDS else None


def check_keys(run_config: Mapping, task_keys: Iterable[str] = ()) -> None:
    """Refuse a run-config key that neither the arguments, the server nor the task reads."""
    known = set(SERVER_KEYS) | set(task_keys)
    unknown = sorted(k for k in run_config if field_of(k) is None and k not in known)
    if unknown:
        raise ConfigError(
            f"`run_config` holds keys no part of the run reads: {unknown}. Use FederatedDPArguments "
            f"fields in kebab case (e.g. `num-rounds`, `target-epsilon`, `batch-size`), "
            f"{sorted(SERVER_KEYS)}, or the task's keys {sorted(task_keys)}."
        )


def federated_args(run_config: Mapping, task_keys: Iterable[str] = ()) -> FederatedDPArguments:
    """`FederatedDPArguments` from a run config (validated: the same errors as the in-process trainer's)."""
    check_keys(run_config, task_keys)
    kwargs = {field_of(k): v for k, v in run_config.items() if field_of(k) is not None}
    kwargs.setdefault("output_dir", tempfile.gettempdir())  # a client writes nothing there
    with warnings.catch_warnings():
        # the fixed-noise-seed warning is repeated by every process that reads the config: the report states it
        warnings.filterwarnings("ignore", message="`noise_seed`=", category=LALoraWarning)
        try:
            return FederatedDPArguments(report_to=[], disable_tqdm=True, eval_rounds=0, save_strategy="no", **kwargs)
        except (ConfigError, ValueError, TypeError) as exc:
            raise ConfigError(f"Invalid run config: {_keys_named(run_config, str(exc))}{exc}") from exc


def _keys_named(run_config: Mapping, message: str) -> str:
    """'run-config key `num-rounds` = 0: ' for the keys whose argument the error names (in snake or kebab case)."""
    named = [k for k in run_config if field_of(k) and (f"`{field_of(k)}`" in message or f"`{k}`" in message)]
    return "".join(f"run-config key `{k}` = {run_config[k]!r}: " for k in named)


def server_setting(run_config: Mapping, key: str) -> float:
    """A server key's value (its default when unset), checked: seconds > 0, or a count >= 0."""
    value = run_config.get(key, SERVER_KEYS[key])
    if key == "max-aborted-rounds":
        fix = "It counts the consecutive aborted rounds before the run stops (0: never); set e.g. `max-aborted-rounds=2`."
        return check_int(key, value, 0, fix)
    return check_number(key, value, "a number of seconds > 0", lambda v: v > 0)
