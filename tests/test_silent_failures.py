"""A failure shared by every client is raised (before any budget is charged where it can be caught up
front), a client whose every example was dropped is not a healthy client, and a training argument the
federated loop would ignore is refused or honoured."""

import warnings

import pytest
import torch
from datasets import Dataset
from fed_helpers import adapter_state, make_trainer, toy_args, toy_dataset
from peft import get_peft_model
from tiny_models import tiny_vit

import peft_lalora.trainer as trainer_module
from peft_lalora import ClientDataError, ConfigError, FederatedDPTrainer, LALoraConfig
from peft_lalora.federated.checkpoint import STATE_DIR
from peft_lalora.federated.client_update import make_optimizer


def _with(dataset, **columns):
    data = dataset.to_dict()
    data.update(columns)
    return Dataset.from_dict(data)


def _broken(kind: str) -> Dataset:
    data = toy_dataset(240)
    n = len(data)
    if kind == "no_labels":
        return data.remove_columns("labels")
    if kind == "labels_out_of_range":
        return _with(data, labels=[5] * n)
    if kind == "string_labels":
        return _with(data, labels=["pos"] * n)
    if kind == "too_long":
        return _with(data, input_ids=[[5] * 80] * n, attention_mask=[[1] * 80] * n)  # 64 positions
    if kind == "token_ids_beyond_vocab":
        return _with(data, input_ids=[[500] * 8] * n)  # vocabulary of 100
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("no_labels", "labels"),
        ("labels_out_of_range", "outside \\[0, 2\\)"),
        ("string_labels", "Client 0"),
        ("too_long", "max_position_embeddings"),
        ("token_ids_beyond_vocab", "vocabulary"),
    ],
)
def test_a_failure_every_client_shares_is_raised_before_any_charge(tmp_path, kind, match):
    # Prepare: every client holds the same broken data
    trainer = make_trainer(tmp_path, dataset=_broken(kind), dirichlet_alpha=None)
    start = adapter_state(trainer.model)
    # Execute / Assert: raised with the first client's message; nothing charged, trained or checkpointed
    with pytest.raises(ClientDataError, match=match):
        trainer.train()
    assert all(trainer.ledger.steps(c) == 0 for c in range(4))
    after = adapter_state(trainer.model)
    assert all(torch.equal(start[n], after[n]) for n in start)
    assert not (tmp_path / STATE_DIR).exists()


def test_a_backend_that_cannot_trace_the_model_is_raised_before_any_charge(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    trainer.privacy_report()  # sets the federation up (the stepper) before training

    def untraceable(batch):
        raise RuntimeError("vmap: cannot trace this model")

    monkeypatch.setattr(trainer.stepper, "probe", untraceable)
    with pytest.raises(ClientDataError, match="cannot trace") as caught:
        trainer.train()
    assert all(trainer.ledger.steps(c) == 0 for c in range(4))
    # under DP the backend's own text (it may quote shapes of private batches) is withheld, also from the chain
    assert "RuntimeError from the per-sample gradient backend" in str(caught.value)
    assert "vmap:" not in str(caught.value) and caught.value.__cause__ is None


@pytest.mark.parametrize("log_private_metrics", [False, True])
def test_a_round_where_every_client_fails_is_raised_and_its_charge_withdrawn(
    tmp_path, monkeypatch, log_private_metrics
):
    trainer = make_trainer(tmp_path, num_rounds=3, log_private_metrics=log_private_metrics)

    def failing_round(**kwargs):
        raise RuntimeError("boom in the local step")

    monkeypatch.setattr(trainer_module, "client_update", failing_round)
    # the exception's own text only on request: it may quote what the model saw of private examples
    match = "boom in the local step" if log_private_metrics else "RuntimeError inside the client's local round"
    with pytest.raises(ClientDataError, match=match) as caught:
        trainer.train()
    assert ("boom" in str(caught.value)) == log_private_metrics
    assert all(trainer.ledger.steps(c) == 0 for c in range(4))
    assert trainer.state.global_step == 0


def vit_clients(nan_clients):
    clients = []
    for k in range(3):
        pixels = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(k))
        if k in nan_clients:
            pixels[:] = float("nan")
        clients.append(Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": [k % 3] * 40}))
    return clients


def vit_trainer(tmp_path, nan_clients, **overrides):
    model = get_peft_model(
        tiny_vit(),
        LALoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], alternation="none"),
    )
    args = toy_args(
        tmp_path, num_clients=3, clients_per_round=3, num_rounds=1, remove_unused_columns=False, **overrides
    )
    return FederatedDPTrainer(model=model, args=args, client_datasets=vit_clients(nan_clients))


@pytest.mark.parametrize("log_private_metrics", [False, True])
def test_a_client_whose_every_example_was_dropped_is_a_failed_client(tmp_path, log_private_metrics):
    trainer = vit_trainer(tmp_path, nan_clients={1}, log_private_metrics=log_private_metrics)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    log = next(entry for entry in trainer.state.log_history if "round" in entry)
    assert log["failed_clients"] == 1.0 and log["clients"] == 2.0
    # the count of dropped examples is computed from the data without noise: logged only on request
    if log_private_metrics:
        assert log["dropped_examples"] > 0
    else:
        assert "dropped_examples" not in log


def test_every_example_dropped_everywhere_is_raised_not_reported_as_loss_zero(tmp_path):
    trainer = vit_trainer(tmp_path, nan_clients={0, 1, 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ClientDataError, match="non-finite"):
            trainer.train()


def test_lr_scheduler_and_warmup_run_over_rounds(tmp_path):
    # Prepare: linear schedule, 1 warmup round, 4 rounds; hand-computed: warmup 0, then lr * (4 - t) / (4 - 1)
    trainer = make_trainer(
        tmp_path, num_rounds=4, lr_scheduler_type="linear", warmup_steps=1, learning_rate=0.3, round_lr_decay=0.5
    )
    trainer.train()
    logged = [log["learning_rate"] for log in trainer.state.log_history if "round" in log]
    expected = [0.0] + [0.3 * (4 - t) / 3 * 0.5**t for t in (1, 2, 3)]
    assert logged == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_default_schedule_is_constant_times_round_decay(tmp_path):
    trainer = make_trainer(tmp_path, num_rounds=3, learning_rate=0.2, round_lr_decay=0.5)
    trainer.train()
    assert [log["learning_rate"] for log in trainer.state.log_history if "round" in log] == [0.2, 0.1, 0.05]


def test_adam_settings_reach_the_client_optimizer(tmp_path):
    trainer = make_trainer(tmp_path, local_optimizer="adamw", adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    trainer.privacy_report()  # sets the federation up before training
    optimizer = make_optimizer(trainer.model, 0.1, trainer._local, trainer.adapter_name)  # the trainer's own settings
    assert optimizer.defaults["betas"] == (0.8, 0.95) and optimizer.defaults["eps"] == 1e-6


def test_bf16_trains_in_mixed_precision_with_the_same_privacy(tmp_path):
    fp32 = make_trainer(tmp_path / "fp32", use_cpu=True)
    bf16 = make_trainer(tmp_path / "bf16", use_cpu=True, bf16=True)
    seen = []
    fp32.train()

    def spy(module, args, output):
        seen.append(output.dtype)

    handle = next(m for n, m in bf16.model.named_modules() if n.endswith("query.base_layer")).register_forward_hook(
        spy
    )
    bf16.train()
    handle.remove()
    assert torch.bfloat16 in seen  # the local step ran under bf16 autocast
    a, b = adapter_state(fp32.model), adapter_state(bf16.model)
    assert all(torch.isfinite(b[n]).all() for n in b)
    assert any(not torch.equal(a[n], b[n]) for n in a)
    assert bf16.privacy_report()["epsilon"] == fp32.privacy_report()["epsilon"]
    assert all(v.dtype == torch.float32 for v in b.values())


@pytest.mark.parametrize(
    "field, value", [("dp", "False"), ("allow_large_delta", "yes"), ("allow_fixed_noise_seed", 1)]
)
def test_wrong_type_for_a_boolean_is_refused(tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"`{field}` must be a bool"):
        toy_args(tmp_path, **{field: value})


@pytest.mark.parametrize(
    "field, value", [("lowpass", "false"), ("lowpass_kernel", "14641"), ("lowpass_kernel", ("1", "4", "6", "4", "1"))]
)
def test_wrong_type_in_the_adapter_config_is_refused(field, value):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        LALoraConfig(target_modules=["query"], **{field: value})


@pytest.mark.parametrize("given", [{"target_epsilon": 3.0}, {"noise_multiplier": 1.0}, {"target_delta": 1e-5}])
def test_dp_false_with_dp_settings_is_refused(tmp_path, given):
    kwargs = dict(output_dir=str(tmp_path), dp=False, report_to=[], **given)
    with pytest.raises(ConfigError, match="dp=False"):
        from peft_lalora import FederatedDPArguments

        FederatedDPArguments(**kwargs)


# ----- found by trying the library as a new user ---------------------------------------------------------------
def test_string_learning_rate_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="`learning_rate` must be > 0"):
        toy_args(tmp_path, learning_rate="0.5")


def test_for_method_refuses_overriding_what_the_method_sets():
    with pytest.raises(ConfigError, match="`lowpass` is set by `method`='lalora'.*lalora_nofilter"):
        LALoraConfig.for_method("lalora", lowpass=False, target_modules=["query"])


def test_string_labels_are_named_as_such(tmp_path):
    trainer = make_trainer(tmp_path, dataset=_broken("string_labels"))
    with pytest.raises(ClientDataError, match="holds values that are not numbers") as caught:
        trainer.train()
    assert "pos" not in str(caught.value)  # a label value of a private example is never quoted


def test_save_model_into_another_runs_folder_is_refused(tmp_path):
    first, second = make_trainer(tmp_path / "a", num_rounds=1), make_trainer(tmp_path / "b", num_rounds=1)
    first.train()
    second.train()
    with pytest.raises(ConfigError, match="holds another run's checkpoint"):
        second.save_model(str(tmp_path / "a"))
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
