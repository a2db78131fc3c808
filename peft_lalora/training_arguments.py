"""Which `TrainingArguments` fields the federated loop honours, and how; the others are refused, not ignored.

A round is not an optimizer step of the Trainer's loop, so some fields mean something else here:
- `lr_scheduler_type`, `warmup_steps`, `lr_scheduler_kwargs`: a schedule over rounds (one learning rate per round,
  from transformers' own `get_scheduler`), times `round_lr_decay` ** round;
- `bf16`: bfloat16 autocast in the local step (DP noise and the clipped sum stay in float32), and in evaluation;
- `adam_beta1`, `adam_beta2`, `adam_epsilon`, `weight_decay`: the client's AdamW / SGD.
The fields in `REFUSED` would be silently ignored: a value other than the Trainer's default raises `ConfigError`
naming the federated field to use instead.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import TrainingArguments, get_scheduler

from .errors import ConfigError

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}

# field -> the federated way to get what it asks for
REFUSED = {
    "max_steps": "`num_rounds` x `local_steps` (a run is a number of rounds)",
    "num_train_epochs": "`num_rounds` and `local_steps` (clients sample Poisson batches, not epochs)",
    "optim": "`local_optimizer` ('sgd' or 'adamw') and `local_momentum`",
    "label_smoothing_factor": "a custom `loss_fn` (the per-example loss has no label smoothing)",
    "gradient_checkpointing": "`model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
    "False})` on the base model before `get_peft_model` (exact per-sample gradients with the "
    "hooks backend; reentrant checkpointing is refused)",
    "fp16": "`bf16=True` (float16 needs a loss scaler, which the DP step does not have)",
    "eval_strategy": "`eval_rounds` (evaluate every N rounds; 0 = only at the end)",
    "eval_steps": "`eval_rounds` (evaluate every N rounds)",
    "eval_delay": "`eval_rounds`",
    "warmup_ratio": "`warmup_steps` (counted in rounds; a value below 1 is a fraction of `num_rounds`)",
}
UNSUPPORTED_SCHEDULES = ("reduce_lr_on_plateau",)


def _is_default(name: str, value) -> bool:
    default = _DEFAULTS.get(name, dataclasses.MISSING)
    if default is dataclasses.MISSING:
        return value is None
    return getattr(value, "value", value) == getattr(default, "value", default) or (not value and not default)


def refuse_ignored_training_arguments(args) -> None:
    """Raise `ConfigError` for a TrainingArguments field that the federated loop would ignore (see `REFUSED`)."""
    for name, instead in REFUSED.items():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if name == "eval_strategy" and getattr(value, "value", value) == "no":
            continue
        if not _is_default(name, value):
            raise ConfigError(
                f"`{name}`={getattr(value, 'value', value)!r} is not honoured by the federated loop, "
                f"which would ignore it (a round is many clients' local steps, not a Trainer step). "
                f"Use {instead} instead, and leave `{name}` at its default."
            )
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if schedule in UNSUPPORTED_SCHEDULES:
        raise ConfigError(
            f"`lr_scheduler_type`={schedule!r} needs a validation metric after every step, which a "
            "round does not provide. Use 'constant', 'linear', 'cosine' or `round_lr_decay`."
        )


def round_learning_rates(args) -> list:
    """The learning rate of every round: `learning_rate` x the schedule over `num_rounds` (warmup counted in
    rounds) x `round_lr_decay` ** round. The schedule is transformers' `get_scheduler`, stepped once per round."""
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(
        schedule,
        optimizer=probe,
        num_warmup_steps=args.get_warmup_steps(args.num_rounds),
        num_training_steps=args.num_rounds,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
    factors = []
    for _ in range(args.num_rounds):
        factors.append(probe.param_groups[0]["lr"])
        probe.step()
        scheduler.step()
    return [args.learning_rate * f * args.round_lr_decay**t for t, f in enumerate(factors)]
