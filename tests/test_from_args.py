"""Each consumer's settings are built from `FederatedDPArguments` in one place, field by named field: no setting
reaches a function because a parameter happens to share its name (`max_grad_norm`, which DP sets to 0.0, reaches
nothing)."""

from fed_helpers import toy_args

from peft_lalora.federated.client_update import LocalConfig
from peft_lalora.federated.seeding import calibration_steps, run_schedule, scheduled_steps
from peft_lalora.privacy.plan import PrivacyPlan


def test_local_config_and_schedule_from_arguments(tmp_path):
    args = toy_args(tmp_path, num_clients=5, local_steps=3, per_device_train_batch_size=7, seed=11)
    local = LocalConfig.from_args(toy_args(tmp_path, local_optimizer="adamw", adam_beta1=0.8, weight_decay=0.1))
    assert (local.local_steps, local.batch_size, local.local_optimizer) == (2, 8, "adamw")
    assert (local.adam_betas, local.adam_epsilon, local.weight_decay) == ((0.8, 0.999), 1e-8, 0.1)
    expected = scheduled_steps(seed=11, rounds=2, num_clients=5, clients_per_round=2, local_steps=3)
    assert run_schedule(args) == expected
    assert sum(expected.values()) == 2 * 2 * 3
    assert calibration_steps(args, [0, 3]) == {0: expected[0], 3: expected[3]}  # the default: "schedule"
    assert calibration_steps(toy_args(tmp_path, sigma_calibration="worst_case"), [0, 3]) is None


def test_privacy_plan_and_ledger_take_the_clip_norm_c_not_the_trainers_max_grad_norm(tmp_path):
    args = toy_args(tmp_path, per_sample_max_grad_norm=0.7, accountant="prv", per_device_train_batch_size=5)
    assert args.max_grad_norm == 0.0  # under DP the Trainer's own clipping is off
    plan = PrivacyPlan.from_args(args, {0: 50, 1: 100})
    assert (plan.per_sample_max_grad_norm, plan.noise_multiplier, plan.accountant) == (0.7, 1.0, "prv")
    assert plan.sample_rates == {0: 0.1, 1: 0.05} and plan.delta == 1e-5
    ledger = plan.new_ledger()
    assert (ledger.noise_multiplier, ledger.delta, ledger.accountant) == (1.0, 1e-5, "prv")
    assert ledger.per_sample_max_grad_norm == 0.7
