"""Every `TrainingArguments` field, classified: the federated loop honours it or refuses it; none is ignored.

A round is not an optimizer step of the Trainer's loop (`FederatedDPTrainer.train` replaces that loop), so a
field is honoured only where this package reads it or where the Trainer's machinery it keeps reads it (`__init__`,
`log`, `evaluate`, the callbacks and integrations). `tests/test_training_arguments.py` walks the fields of the
installed transformers, so a field that a new release adds fails the tests until it is classified here.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import TrainingArguments, get_scheduler

from .checks import plain
from .errors import ConfigError

# Honoured, and they change the trained adapter: the resume check compares them (`FederatedDPArguments`).
# `per_device_train_batch_size`: each client's expected Poisson batch; `learning_rate`, `lr_scheduler_type`,
# `lr_scheduler_kwargs`, `warmup_steps`: a schedule over rounds (`round_learning_rates`); `weight_decay`, `adam_*`:
# the client optimizer (`federated.client_update.make_optimizer`); `bf16`: autocast in the local step and in
# evaluation; `tf32`, `full_determinism`: set by `TrainingArguments` and the Trainer's `__init__`; `seed`: the
# partition, the client selection and the initialisation (`federated.seeding`).
RESULT = frozenset(
    """per_device_train_batch_size learning_rate lr_scheduler_type lr_scheduler_kwargs warmup_steps weight_decay
    adam_beta1 adam_beta2 adam_epsilon bf16 tf32 full_determinism seed""".split()
)
# Honoured without changing the adapter. Where it runs and what it writes: the trainer's checkpoints and
# `save_model` (`save_strategy`: "steps", after every round, or "no"), `push_to_hub`, the Trainer's process setup.
# What it logs: the Trainer's `log`, callbacks and integrations. Evaluation: `Trainer.evaluate`, inherited unchanged
# (the local steps draw Poisson batches from the collated shard, with no DataLoader). Scripts' own flags (`do_*`,
# `resume_from_checkpoint`), which no Trainer reads.
HONOURED = frozenset(
    """output_dir save_strategy save_on_each_node push_to_hub hub_token hub_private_repo hub_model_id use_cpu
    local_rank ddp_backend ddp_timeout use_cache
    log_level log_level_replica log_on_each_node disable_tqdm report_to run_name project trackio_space_id
    trackio_bucket_id trackio_static_space_id
    per_device_eval_batch_size prediction_loss_only eval_do_concat_batches eval_use_gather_object
    eval_accumulation_steps include_for_metrics batch_eval_metrics label_names remove_unused_columns
    skip_memory_metrics accelerator_config dataloader_drop_last dataloader_num_workers dataloader_pin_memory
    dataloader_persistent_workers dataloader_prefetch_factor dataloader_multiprocessing_context dataloader_in_order
    do_train do_eval do_predict resume_from_checkpoint""".split()
)
_ROUNDS = "use `num_rounds` and `local_steps` (a run is rounds of local steps on Poisson batches)"
_EVAL = "use `eval_rounds` (evaluate every N rounds; 0 = only at the end), or call `trainer.evaluate()`"
_LAST = "the adapter of the last round is saved: pick `num_rounds` from the evaluations every `eval_rounds`"
_ONE_CHECKPOINT = "the run keeps one checkpoint, rewritten after every round (`save_strategy='no'`: none)"
_LOGGED = "there is none: every round is logged once (round, learning rate, clients, epsilon)"
_NO_WRAPPER = "there is none: each process runs its share of the clients, with no DDP/FSDP wrapper or sharding"
_OPTIMIZER = "use `local_optimizer` ('sgd' or 'adamw'), `local_momentum`, `weight_decay` and the `adam_*` fields"
_CHECKPOINTING = (
    "call `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})` on the "
    "base model before `get_peft_model` (exact per-sample gradients; reentrant checkpointing is refused)"
)
_BF16 = "use `bf16=True` (autocast in the local step and in evaluation; float16 would need a loss scaler)"
# Refused when set to anything but the default: field -> what to do instead.
REFUSED = {
    **dict.fromkeys(("num_train_epochs", "max_steps"), _ROUNDS),
    **dict.fromkeys(("optim", "optim_args", "optim_target_modules"), _OPTIMIZER),
    "gradient_accumulation_steps": "raise `per_device_train_batch_size` (each local step is one Poisson batch)",
    "average_tokens_across_devices": "there is none: the loss is a mean over each example's own tokens",
    "max_grad_norm": "use `per_sample_max_grad_norm`, the DP clip norm C (no run clips the batch gradient: 0 says so)",
    "label_smoothing_factor": "pass a custom `loss_fn` (the per-example loss has no label smoothing)",
    **dict.fromkeys(("fp16", "fp16_full_eval", "bf16_full_eval"), _BF16),
    **dict.fromkeys(("gradient_checkpointing", "gradient_checkpointing_kwargs"), _CHECKPOINTING),
    **dict.fromkeys(("activation_checkpointing", "activation_checkpointing_kwargs"), _CHECKPOINTING),
    **dict.fromkeys(
        ("torch_compile", "torch_compile_backend", "torch_compile_mode", "use_liger_kernel", "liger_kernel_config"),
        "there is none: the local step runs the model as given (per-sample gradient hooks, no compiled kernels)",
    ),
    "neftune_noise_alpha": "there is none: embedding noise is not applied, and the DP accountant would not count it",
    "torch_empty_cache_steps": "there is none: the local steps do not empty the device cache",
    "auto_find_batch_size": "set `per_device_train_batch_size` (B sets the sample rate q = B / n_k of the accounting)",
    **dict.fromkeys(("logging_strategy", "logging_steps", "logging_first_step"), _LOGGED),
    **dict.fromkeys(("logging_nan_inf_filter", "include_num_input_tokens_seen"), _LOGGED),
    **dict.fromkeys(("eval_strategy", "eval_steps", "eval_delay", "eval_on_start"), _EVAL),
    **dict.fromkeys(("load_best_model_at_end", "metric_for_best_model", "greater_is_better"), _LAST),
    **dict.fromkeys(("save_steps", "save_total_limit", "save_only_model", "enable_jit_checkpoint"), _ONE_CHECKPOINT),
    **dict.fromkeys(
        ("ignore_data_skip", "restore_callback_states_from_checkpoint"),
        "`train(resume_from_checkpoint=True)` continues at the next round (nothing is skipped; callbacks start anew)",
    ),
    **dict.fromkeys(
        ("hub_strategy", "hub_always_push", "hub_revision"), "call `trainer.push_to_hub()` after training"
    ),
    **dict.fromkeys(
        ("data_seed", "train_sampling_strategy", "length_column_name"),
        "set `seed` (the partition and the client selection; the Poisson batches come from the private root)",
    ),
    **dict.fromkeys(
        ("ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph"), _NO_WRAPPER
    ),
    **dict.fromkeys(("fsdp", "fsdp_config", "deepspeed", "parallelism_config"), _NO_WRAPPER),
    "debug": "there is none: the Trainer's debug options act in the loop the federated one replaces",
}
# Values other than the default that say what the run does (HfArgumentParser gives False for "no").
_ALSO_ACCEPTED = {"max_grad_norm": (0, None), "include_num_input_tokens_seen": (False,)}
# Honoured fields' values that the federated loop cannot honour: field -> {value: why}.
REFUSED_VALUES = {
    "save_strategy": dict.fromkeys(("epoch", "best"), f"it checkpoints after every round ('steps') or never; {_LAST}"),
    "lr_scheduler_type": {
        "reduce_lr_on_plateau": "it needs a validation metric after every step, which a round does not provide "
        "(use 'constant', 'linear', 'cosine' or `round_lr_decay`)"
    },
}
_DEFAULTS = {
    f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    for f in dataclasses.fields(TrainingArguments)
}


def refuse_unhonoured(given: dict) -> None:
    """Raise `ConfigError` for a `REFUSED` field of `given` (the values as set, before `TrainingArguments` derives
    others from them) that is not at its default, or a value in `REFUSED_VALUES`."""
    for name, instead in REFUSED.items():
        value, default = plain(given[name]), plain(_DEFAULTS[name])
        if value == default or (not value and not default) or value in _ALSO_ACCEPTED.get(name, ()):
            continue
        raise ConfigError(
            f"`{name}`={value!r} is not honoured by the federated loop (a round is many clients' local steps, not "
            f"a Trainer step): leave it at its default ({default!r}); instead, {instead}."
        )
    for name, refused in REFUSED_VALUES.items():
        value = plain(given[name])
        if value in refused:
            raise ConfigError(f"`{name}`={value!r} is not honoured by the federated loop: {refused[value]}.")


def round_learning_rates(args) -> list:
    """The learning rate of every round: `learning_rate` x the schedule over `num_rounds` (warmup counted in
    rounds) x `round_lr_decay` ** round. The schedule is transformers' `get_scheduler`, stepped once per round."""
    schedule = plain(args.lr_scheduler_type)
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
