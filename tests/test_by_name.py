"""`call_by_name`: settings handed on by name (what `LocalConfig.from_args` and `PrivacyPlan.from_args` use)."""

from types import SimpleNamespace

import pytest
from fed_helpers import toy_args

from peft_lalora.by_name import call_by_name
from peft_lalora.federated.client_update import LocalConfig
from peft_lalora.federated.seeding import calibration_steps, run_schedule, scheduled_steps


def _f(a, *, b, c=3):
    return (a, b, c)


def test_reads_each_parameter_from_the_same_named_attribute():
    assert call_by_name(_f, SimpleNamespace(a=1, b=2, c=30)) == (1, 2, 30)


def test_given_values_win_over_attributes():
    assert call_by_name(_f, SimpleNamespace(a=1, b=2, c=30), b=20) == (1, 20, 30)


def test_a_missing_setting_is_an_error_even_where_the_function_has_a_default():
    with pytest.raises(AttributeError, match="'c'"):
        call_by_name(_f, SimpleNamespace(a=1, b=2))


def test_local_config_and_schedule_from_arguments(tmp_path):
    args = toy_args(tmp_path, num_clients=5, local_steps=3, per_device_train_batch_size=7, adam_beta1=0.8, seed=11)
    local = LocalConfig.from_args(args)
    assert (local.local_steps, local.batch_size, local.local_optimizer) == (3, 7, args.local_optimizer)
    assert local.adam_betas == (0.8, args.adam_beta2)
    assert local.adam_epsilon == args.adam_epsilon
    expected = scheduled_steps(seed=11, rounds=2, num_clients=5, clients_per_round=2, local_steps=3)
    assert run_schedule(args) == expected
    assert sum(expected.values()) == 2 * 2 * 3
    assert calibration_steps(args, [0, 3]) == {0: expected[0], 3: expected[3]}  # the default: "schedule"
    assert calibration_steps(toy_args(tmp_path, sigma_calibration="worst_case"), [0, 3]) is None
