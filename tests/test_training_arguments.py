"""Every `TrainingArguments` field is honoured or refused (an allow-list, walked over the installed transformers), and
every setting that changes the result is in the resume check."""

import dataclasses

import pytest
from fed_helpers import toy_args
from transformers import TrainingArguments

from peft_lalora import FederatedDPArguments
from peft_lalora.arguments import OUTCOME, OUTCOME_FREE
from peft_lalora.errors import ConfigError
from peft_lalora.training_arguments import HONOURED, REFUSED, RESULT

INHERITED = [f.name for f in dataclasses.fields(TrainingArguments)]
OWN = [f.name for f in dataclasses.fields(FederatedDPArguments) if f.name not in INHERITED]

# A value other than the default for every refused field (written here, not derived from the table under test).
NOT_DEFAULT = {
    "num_train_epochs": 1.0,
    "max_steps": 10,
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "optim_target_modules": ["query"],
    "gradient_accumulation_steps": 2,
    "average_tokens_across_devices": False,
    "max_grad_norm": 0.5,
    "label_smoothing_factor": 0.1,
    "fp16": True,
    "fp16_full_eval": True,
    "bf16_full_eval": True,
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "activation_checkpointing": True,
    "activation_checkpointing_kwargs": {"offload": True},
    "torch_compile": True,
    "torch_compile_backend": "inductor",
    "torch_compile_mode": "max-autotune",
    "use_liger_kernel": True,
    "liger_kernel_config": {"rope": True},
    "neftune_noise_alpha": 5.0,
    "torch_empty_cache_steps": 4,
    "auto_find_batch_size": True,
    "logging_strategy": "no",
    "logging_steps": 10,
    "logging_first_step": True,
    "logging_nan_inf_filter": False,
    "include_num_input_tokens_seen": "all",
    "eval_strategy": "steps",
    "eval_steps": 5,
    "eval_delay": 1,
    "eval_on_start": True,
    "load_best_model_at_end": True,
    "metric_for_best_model": "accuracy",
    "greater_is_better": True,
    "save_steps": 100,
    "save_total_limit": 2,
    "save_only_model": True,
    "enable_jit_checkpoint": True,
    "ignore_data_skip": True,
    "restore_callback_states_from_checkpoint": True,
    "hub_strategy": "checkpoint",
    "hub_always_push": True,
    "hub_revision": "dev",
    "data_seed": 3,
    "train_sampling_strategy": "sequential",
    "length_column_name": "n_tokens",
    "ddp_find_unused_parameters": True,
    "ddp_bucket_cap_mb": 25,
    "ddp_broadcast_buffers": True,
    "ddp_static_graph": True,
    "fsdp": "full_shard",
    "fsdp_config": {"min_num_params": 1},
    "deepspeed": "ds_config.json",
    "parallelism_config": {"tp_size": 2},
    "debug": "underflow_overflow",
}


def test_every_training_argument_is_honoured_or_refused_exactly_once():
    classes = {"RESULT": RESULT, "HONOURED": HONOURED, "REFUSED": set(REFUSED)}
    for name in INHERITED:
        where = [c for c, names in classes.items() if name in names]
        assert len(where) == 1, f"TrainingArguments.{name} is in {where or 'no class'} of training_arguments.py"
    assert set(RESULT) | HONOURED | set(REFUSED) == set(INHERITED)  # no entry for a field transformers dropped


def test_every_federated_argument_is_in_or_out_of_the_resume_check_exactly_once():
    assert sorted(OUTCOME + OUTCOME_FREE) == sorted(OWN)


def test_every_refused_field_has_a_non_default_value_here():
    assert set(NOT_DEFAULT) == set(REFUSED)


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_a_refused_field_set_to_another_value_is_refused_naming_it(tmp_path, field):
    with pytest.raises(ConfigError, match=f"`{field}`=.* is not honoured by the federated loop.*; instead, "):
        toy_args(tmp_path, **{field: NOT_DEFAULT[field]})


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("save_strategy", "epoch", "after every round .*adapter of the last round"),
        ("save_strategy", "best", "after every round .*adapter of the last round"),
        ("lr_scheduler_type", "reduce_lr_on_plateau", "needs a validation metric"),
    ],
)
def test_a_value_the_loop_cannot_honour_is_refused(tmp_path, field, value, match):
    with pytest.raises(ConfigError, match=f"`{field}`='{value}' is not honoured by the federated loop: .*{match}"):
        toy_args(tmp_path, **{field: value})


def test_load_best_model_at_end_with_save_strategy_best_is_refused_not_ignored(tmp_path):
    with pytest.raises(ConfigError, match="`load_best_model_at_end`=True"):
        toy_args(tmp_path, load_best_model_at_end=True, save_strategy="best", metric_for_best_model="loss")


def test_max_grad_norm_zero_is_accepted_and_the_defaults_are_not_refused(tmp_path):
    assert toy_args(tmp_path, max_grad_norm=0.0).max_grad_norm == 0.0
    assert toy_args(tmp_path, dp=False).max_grad_norm == 1.0
    with pytest.raises(ConfigError, match="`max_grad_norm`=0.5.*`per_sample_max_grad_norm`"):
        toy_args(tmp_path, dp=False, max_grad_norm=0.5)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"adam_beta1": 0.8}, "`adam_beta1`=0.8 would be ignored by `local_optimizer`='sgd'"),
        ({"local_optimizer": "adamw", "local_momentum": 0.9}, "`local_momentum`=0.9 would be ignored"),
    ],
)
def test_a_setting_of_the_other_client_optimizer_is_refused(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        toy_args(tmp_path, **overrides)


def test_resume_settings_hold_every_result_changing_setting(tmp_path):
    settings = toy_args(tmp_path, local_optimizer="adamw", weight_decay=0.01).resume_settings()
    assert set(settings) == set(RESULT) | set(OUTCOME)
    assert {"weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_kwargs"} <= set(settings)
    assert settings["weight_decay"] == 0.01 and settings["lr_scheduler_type"] == "constant"
