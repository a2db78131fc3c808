"""`FederatedDPArguments`: `TrainingArguments` plus the federated and privacy settings, validated up front."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from .checks import check_bool, check_choice, check_int, check_number, check_positive, given_settings, plain
from .errors import ConfigError, LALoraWarning
from .privacy.accounting import ACCOUNTANTS
from .round_arguments import validate_round_policy
from .training_arguments import RESULT, refuse_unhonoured

AGGREGATION_WEIGHTS = ("uniform", "num_samples")
LOCAL_OPTIMIZERS = ("sgd", "adamw")
BACKENDS = ("auto", "hooks", "func")
SIGMA_CALIBRATIONS = ("schedule", "worst_case")
PRIVACY_UNITS = ("example", "user")  # what one DP step protects inside a client (see `privacy.users`)
# The fields this class adds that change the trained adapter or its accounting: with `training_arguments.RESULT`,
# what a resumed run must share with its checkpoint (`resume_settings`). `OUTCOME_FREE`: the fields it adds that do
# not (a resumed run may change them). tests/test_training_arguments.py checks that every field is in one of them.
OUTCOME = """num_clients clients_per_round num_rounds local_steps dirichlet_alpha min_shard_size dp target_epsilon
    target_delta noise_multiplier per_sample_max_grad_norm per_sample_head_max_grad_norm accountant sigma_calibration
    prior_privacy_report prior_privacy_same_data lora_b_lr_ratio round_lr_decay min_clients_per_round
    aggregation_weights local_optimizer local_momentum label_column noise_seed aggregation aggregation_trim
    client_dp client_clip_norm client_noise_multiplier client_target_epsilon client_target_delta
    privacy_unit user_column""".split()
OUTCOME_FREE = """allow_large_delta eval_rounds per_sample_grad_backend allow_fixed_noise_seed log_private_metrics
    overwrite_output_dir card_dataset_name card_data_format""".split()


def _field(default, text: str):
    """A field with its `--help` text (`HfArgumentParser` reads `metadata["help"]`)."""
    return field(default=default, metadata={"help": text})


@dataclass
class FederatedDPArguments(TrainingArguments):
    """
    Arguments of `FederatedDPTrainer`: `TrainingArguments` plus the federated and privacy fields, each explained by
    its `help` (the recipes' `--help`). `learning_rate` is the local learning rate of round 0 (round t's is
    `round_lr_decay` ** t times the schedule's). Without `prior_privacy_report`, the report next to the adapter the
    model was loaded from (`PeftModel.from_pretrained` of a local folder, or a cached Hub snapshot) is found offline
    (`peft_lalora.privacy.prior`). `card_dataset_name` is not `dataset_name` because scripts' own data arguments use
    that flag.
    """

    per_device_train_batch_size: int = _field(  # TrainingArguments' field and default; its meaning here
        8,
        "Each client's expected Poisson batch size B: a client with n_k examples samples every example with "
        "probability q = B / n_k at each local step.",
    )
    num_clients: int = _field(10, "Number of federated clients.")
    clients_per_round: int = _field(4, "Clients sampled per round.")
    num_rounds: int = _field(10, "Federated rounds.")
    local_steps: int = _field(10, "Local DP-SGD steps per client and round.")
    dirichlet_alpha: Optional[float] = _field(None, "Dirichlet label split; None = IID.")
    min_shard_size: Optional[int] = _field(None, "Smallest shard (default: batch size).")
    dp: bool = _field(True, "Sample-level DP-SGD; False = non-private baseline.")
    target_epsilon: Optional[float] = _field(None, "Target epsilon (calibrates sigma).")
    target_delta: Optional[float] = _field(None, "Delta; default min(1e-5, 1/n_smallest).")
    allow_large_delta: bool = _field(False, "Allow target_delta >= 1/n_k (warns).")
    noise_multiplier: Optional[float] = _field(None, "Explicit sigma (epsilon reported).")
    per_sample_max_grad_norm: float = _field(1.0, "Per-example clip norm C.")
    per_sample_head_max_grad_norm: Optional[float] = _field(
        None,
        "Clipping groups: clip the head's per-example gradient to this norm and the LoRA factors' to "
        "per_sample_max_grad_norm, separately; the noise covers the joint sensitivity sqrt(C^2 + C_head^2). "
        "None: one joint clip (the head can take most of C).",
    )
    privacy_unit: str = _field(
        "example",
        "What DP protects inside a client: 'example' (one example) or 'user' (all the examples of one "
        "user, named by --user_column; users are Poisson sampled at q = batch size / users of the client, one "
        "example each).",
    )
    user_column: Optional[str] = _field(
        None, "With privacy_unit='user': the dataset column naming each example's user."
    )
    accountant: str = _field("rdp", "Privacy accountant: 'rdp' or 'prv'.")
    prior_privacy_report: Optional[str] = _field(
        None,
        "An earlier run's privacy_report.json (or adapter folder) for the adapter this run starts from; "
        "default: found next to the adapter the model was loaded from.",
    )
    prior_privacy_same_data: bool = _field(
        False,
        "The earlier run used the same data: compose its accountant events into this run's epsilon. "
        "False: the report and card say the earlier epsilon is NOT included.",
    )
    lora_b_lr_ratio: float = _field(1.0, "LR of lora_B relative to lora_A and the head.")
    round_lr_decay: float = _field(1.0, "Per-round learning-rate decay factor.")
    eval_rounds: int = _field(1, "Evaluate every N rounds (0 = only at the end).")
    min_clients_per_round: int = _field(1, "Abort a round with fewer survivors.")
    aggregation_weights: str = _field("uniform", "'uniform' or 'num_samples'.")
    local_optimizer: str = _field("sgd", "Client optimizer: 'sgd' or 'adamw'.")
    local_momentum: float = _field(0.0, "SGD momentum of the client optimizer.")
    per_sample_grad_backend: str = _field("auto", "'auto', 'hooks' or 'func'.")
    label_column: str = _field("labels", "Label column used by the Dirichlet split.")
    sigma_calibration: str = _field(
        "schedule",
        "With target_epsilon: 'schedule' calibrates sigma for each client's scheduled steps (the public "
        "participation schedule); 'worst_case' for a client taking part in every round.",
    )
    noise_seed: Optional[int] = _field(
        None,
        "Fix the seed of the DP noise and the Poisson batches (tests, research). Then NO privacy guarantee "
        "holds (anyone who knows it can re-create the noise): the report and card say so and push_to_hub "
        "refuses. Default None: secret randomness from the operating system, kept in the private checkpoint.",
    )
    allow_fixed_noise_seed: bool = _field(
        False, "Allow push_to_hub of a run whose `noise_seed` was fixed (its privacy report says it is not private)."
    )
    log_private_metrics: bool = _field(
        False,
        "Under DP, also log and return what is computed from the private training data without noise: "
        "the training loss (per round and `train_loss`), the counts of sampled and dropped examples, and the "
        "text of a failing client's error (it may quote a length or a batch size). These are OUTSIDE the DP "
        "guarantee (an audit tells neighbouring datasets apart from them). Default False: a DP run logs only "
        "round, learning_rate, clients, failed_clients and epsilon. A non-private run always logs them. (A Flower "
        "node has its own switch, `share-training-metrics`.)",
    )
    # The federated loop's own defaults for TrainingArguments fields it reads differently (schedules over rounds).
    lr_scheduler_type: str = _field(
        "constant",
        "Learning-rate schedule over rounds (transformers' names: 'constant', 'linear', 'cosine', ...); "
        "one value per round, times `round_lr_decay` ** round.",
    )
    overwrite_output_dir: bool = _field(
        False, "Delete the run an `output_dir` holds (checkpoint, adapter, card) before training."
    )
    card_dataset_name: Optional[str] = _field(None, "Dataset named in the model card (e.g. 'glue/sst2').")
    card_data_format: Optional[str] = _field(
        None,
        "The training data's format, described in the model card's 'Training data' section (e.g. the "
        "prompt template of an instruction-tuned causal LM).",
    )
    # ----- the round's server-side policy (`federated.round.RoundPolicy`) -----
    aggregation: str = _field(
        "mean", "Aggregation rule of the clients' deltas (`federated.rules`): 'mean' or 'trimmed_mean'."
    )
    aggregation_trim: float = _field(
        0.2, "trimmed_mean: fraction of the largest and of the smallest values dropped per coordinate."
    )
    # ----- client-level DP on the server (DP-FedAvg; `federated.client_dp`, `privacy.client_level`) -----
    client_dp: bool = _field(
        False,
        "Client-level DP: Poisson-sample clients at rate clients_per_round / num_clients, clip each "
        "update to client_clip_norm, add Gaussian noise to the sum (trusted server). With or without `dp`.",
    )
    client_clip_norm: Optional[float] = _field(None, "Client-level DP: clip norm S.")
    client_noise_multiplier: Optional[float] = _field(None, "Client-level DP: noise multiplier z (epsilon reported).")
    client_target_epsilon: Optional[float] = _field(
        None, "Client-level DP: target epsilon over num_rounds (z calibrated)."
    )
    client_target_delta: Optional[float] = _field(None, "Client-level DP: delta; default min(1e-5, 1 / num_clients).")

    def __post_init__(self):
        for name in """dp allow_large_delta allow_fixed_noise_seed log_private_metrics overwrite_output_dir bf16 fp16
            prior_privacy_same_data client_dp""".split():
            check_bool(name, getattr(self, name))
        if self.user_column == "":  # a Flower run config (TOML has no null) leaves it empty for none
            self.user_column = None
        refuse_unhonoured(vars(self))  # the values as set: `TrainingArguments.__post_init__` derives some from others
        super().__post_init__()
        if self.dp and self.max_grad_norm not in (None, 0, 0.0):
            # The Trainer's global clipping would log a non-private gradient norm; DP clips per example instead.
            self.max_grad_norm = 0.0
        self.validate()

    def validate(self) -> None:
        if self.push_to_hub and not self.hub_model_id:  # checked now, not after all the training
            raise ConfigError(
                "`push_to_hub=True` needs `hub_model_id`, the Hub repo to push to (e.g. 'alice/lalora-sst2'), got "
                f"{self.hub_model_id!r}. Set `hub_model_id` (`--hub_model_id` in the recipes), or leave "
                "`push_to_hub` False."
            )
        for name in ("num_clients", "clients_per_round", "num_rounds", "local_steps", "min_clients_per_round"):
            check_int(name, getattr(self, name), 1)
        check_int("eval_rounds", self.eval_rounds, 0)
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"`clients_per_round` must be in [1, num_clients={self.num_clients}], got {self.clients_per_round}."
            )
        if self.min_clients_per_round > self.clients_per_round:
            raise ConfigError(
                f"`min_clients_per_round` must be <= clients_per_round={self.clients_per_round}, got "
                f"{self.min_clients_per_round}."
            )
        if self.dirichlet_alpha is not None:
            check_positive("dirichlet_alpha", self.dirichlet_alpha, "use None for an IID split")
        if self.min_shard_size is not None:
            check_int("min_shard_size", self.min_shard_size, 1)
        check_positive("learning_rate", self.learning_rate, "the local learning rate of round 0, e.g. 0.5")
        check_number("weight_decay", self.weight_decay, "a number >= 0.0", lambda v: 0 <= v < math.inf)
        check_positive("lora_b_lr_ratio", self.lora_b_lr_ratio, "1.0 gives every factor the same learning rate")
        check_positive("round_lr_decay", self.round_lr_decay, "1.0 keeps the learning rate constant")
        check_choice("aggregation_weights", self.aggregation_weights, AGGREGATION_WEIGHTS)
        check_choice("local_optimizer", self.local_optimizer, LOCAL_OPTIMIZERS)
        check_choice("per_sample_grad_backend", self.per_sample_grad_backend, BACKENDS)
        validate_round_policy(self)
        self._validate_unit()
        check_number("local_momentum", self.local_momentum, "in [0, 1)", lambda v: 0 <= v < 1)
        _refuse_unused_optimizer_settings(self)
        if self.noise_seed is not None:
            check_int("noise_seed", self.noise_seed, 0)
        if self.prior_privacy_report is not None and not isinstance(self.prior_privacy_report, str):
            raise ConfigError(
                f"`prior_privacy_report` must be a path (str) to an earlier run's privacy_report.json or adapter "
                f"folder, got {self.prior_privacy_report!r}."
            )
        if self.dp:
            self._validate_dp()
        elif self.prior_privacy_same_data:
            raise ConfigError(
                "`prior_privacy_same_data`=True composes an earlier run's privacy spending into this run's epsilon, "
                "but `dp=False` trains without privacy (epsilon = inf). Drop it, or keep `dp=True`."
            )
        else:
            names = ["target_epsilon", "target_delta", "noise_multiplier"] + ([] if self.client_dp else ["noise_seed"])
            if given := given_settings(self, names):
                raise ConfigError(
                    f"`dp=False` trains without any privacy, but DP settings were given: {given}. Drop them for the "
                    "non-private baseline, or keep `dp=True` for a private run."
                )

    def _validate_unit(self) -> None:
        check_choice("privacy_unit", self.privacy_unit, PRIVACY_UNITS)
        if self.privacy_unit == "user" and (not isinstance(self.user_column, str) or not self.user_column):
            raise ConfigError(
                f"`privacy_unit`='user' needs `user_column`, the dataset column naming each example's user, got "
                f"{self.user_column!r}. Set e.g. `user_column='patient_id'` (`--user_column` in the recipes), or "
                "use `privacy_unit`='example'."
            )
        if self.privacy_unit == "example" and self.user_column is not None:
            raise ConfigError(
                f"`user_column`={self.user_column!r} is read only with `privacy_unit`='user', got "
                "`privacy_unit`='example' (one example is the unit, users are ignored). Set `privacy_unit`='user' "
                "to protect every example of a user, or drop `user_column`."
            )

    def _validate_dp(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError(
                "Give exactly one of `target_epsilon` (sigma is calibrated) and `noise_multiplier` "
                f"(epsilon is reported), got target_epsilon={self.target_epsilon!r}, "
                f"noise_multiplier={self.noise_multiplier!r}. Or set `dp=False` for the non-private baseline."
            )
        if self.target_epsilon is not None:
            check_positive("target_epsilon", self.target_epsilon, "e.g. 1.0, 3.0 or 8.0")
        if self.noise_multiplier is not None:
            check_number("noise_multiplier", self.noise_multiplier, ">= 0", lambda v: 0 <= v < math.inf)
            if self.noise_multiplier == 0:
                warnings.warn(
                    "`noise_multiplier=0.0`: no noise, epsilon = inf. This run is NOT private.",
                    LALoraWarning,
                    stacklevel=3,
                )
        if self.target_delta is not None:
            fix = "The default is min(1e-5, 1 / n) for the smallest client."
            check_number("target_delta", self.target_delta, "in (0, 1)", lambda v: 0 < v < 1, fix)
        check_positive(
            "per_sample_max_grad_norm", self.per_sample_max_grad_norm, "e.g. 1.0; it is a fixed clip norm C"
        )
        if self.per_sample_head_max_grad_norm is not None:
            check_positive(
                "per_sample_head_max_grad_norm",
                self.per_sample_head_max_grad_norm,
                "a fixed clip norm of the head, or None for one joint clip",
            )
        check_choice("accountant", self.accountant, ACCOUNTANTS)
        check_choice("sigma_calibration", self.sigma_calibration, SIGMA_CALIBRATIONS)
        if self.noise_seed is not None:
            warnings.warn(
                f"`noise_seed`={self.noise_seed} fixes the DP noise and the Poisson batches: anyone who "
                "knows it can re-create them, so this run has NO differential-privacy guarantee, whatever "
                "epsilon it reports. Use it for tests and research only; leave it None for a private run.",
                LALoraWarning,
                stacklevel=3,
            )

    def resume_settings(self) -> dict:
        """The settings that change the result, which a resumed run must share with the checkpoint it resumes."""
        return {n: plain(getattr(self, n)) for n in sorted(RESULT) + OUTCOME}


def _refuse_unused_optimizer_settings(args) -> None:
    """The `adam_*` fields with `local_optimizer="sgd"`, and `local_momentum` with "adamw", would be ignored."""
    if args.local_optimizer == "adamw":
        unused, other = ({"local_momentum": args.local_momentum} if args.local_momentum else {}), "sgd"
    else:
        adam = ("adam_beta1", "adam_beta2", "adam_epsilon")
        default = TrainingArguments.__dataclass_fields__
        unused, other = {n: getattr(args, n) for n in adam if getattr(args, n) != default[n].default}, "adamw"
    if unused:
        raise ConfigError(
            f"{', '.join(f'`{n}`={v!r}' for n, v in unused.items())} would be ignored by `local_optimizer`="
            f"{args.local_optimizer!r}: set `local_optimizer`={other!r}, or leave it at its default."
        )
