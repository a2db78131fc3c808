"""Nothing private outside epsilon (RELIABILITY R24): the attacks of an adversary who reads the code.

- One over-long example past the rows the model probes (row 30 of a shard, `PROBE_ROWS` = 16) used to make its
  client fail only in the rounds whose Poisson batch drew it, and the failure text quoted its length and the
  realised batch size. The whole shard is now checked before anything is charged.
- Under DP the noise-free training loss and the dropped counts were logged every round; they separate two
  neighbouring datasets. They are logged only with `log_private_metrics=True`.
"""

import logging
import math
import re

import pytest
import torch
from datasets import Dataset
from fed_helpers import adapter_state, make_trainer, toy_args, toy_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

import peft_lalora.trainer as trainer_module
from peft_lalora import ClientDataError, ConfigError, FederatedDPTrainer
from peft_lalora.federated.checkpoint import STATE_DIR
from peft_lalora.federated.preflight import PROBE_ROWS

LONG_ROW, LONG_LENGTH, BATCH = 30, 80, 8  # the private values that must never be quoted (tiny RoBERTa: 64 positions)
PUBLIC_ROUND_KEYS = {"round", "learning_rate", "clients", "failed_clients", "epsilon", "epoch", "step"}
PRIVATE_ROUND_KEYS = {"loss", "sampled_examples", "dropped_examples"}


def word_tokenizer():
    """Word-level tokenizer over the tiny RoBERTa's vocabulary; its padding id is the model's (1)."""
    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(98)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), pad_token="[PAD]", unk_token="[UNK]"
    )


def shard(seed: int, long_row=None, n: int = 60) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, 8), generator=g).tolist()
    if long_row is not None:
        ids[long_row] = [5] * LONG_LENGTH
    return Dataset.from_dict({"input_ids": ids, "labels": [int(row[0] > 50) for row in ids]})


def federation(tmp_path, clients, **overrides) -> FederatedDPTrainer:
    args = toy_args(tmp_path, num_clients=len(clients), clients_per_round=len(clients), **overrides)
    return FederatedDPTrainer(
        model=toy_model(), args=args, client_datasets=clients, data_collator=DataCollatorWithPadding(word_tokenizer())
    )


def quotes(text: str, *numbers) -> bool:
    return any(re.search(rf"(?<![\w.]){n}(?![\w.])", text) for n in numbers)


def lib_messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("peft_lalora"))


# ----- an example the first rows do not show --------------------------------------------------------------------
def test_an_over_long_example_past_the_probed_rows_of_the_only_client_is_raised_before_any_charge(tmp_path):
    # Prepare: one client whose only bad example is row 30, past the rows the model runs on
    assert LONG_ROW >= PROBE_ROWS
    trainer = federation(tmp_path, [shard(0, long_row=LONG_ROW)], num_rounds=8)
    trainer.privacy_report()  # sets the federation up (the ledger) before training
    start = adapter_state(trainer.model)
    # Execute
    with pytest.raises(ClientDataError, match="`max_position_embeddings`=64") as caught:
        trainer.train()
    # Assert: nothing charged, trained or checkpointed; the message names the rule and the public limit only
    assert trainer.ledger.steps(0) == 0
    after = adapter_state(trainer.model)
    assert all(torch.equal(start[n], after[n]) for n in start)
    assert not (tmp_path / STATE_DIR).exists()
    assert "truncate" in str(caught.value) and "max_length=62" in str(caught.value)
    assert not quotes(str(caught.value), LONG_LENGTH, LONG_ROW, BATCH)


@pytest.mark.parametrize("long_row", [0, LONG_ROW, 59])
def test_an_over_long_example_of_one_client_drops_it_from_every_round_with_a_warning(tmp_path, caplog, long_row):
    # Prepare: client 0 holds one over-long example, client 1 is healthy; both take part in every round
    trainer = federation(tmp_path, [shard(0, long_row=long_row), shard(1)], num_rounds=8)
    start = adapter_state(trainer.model)
    # Execute
    with caplog.at_level(logging.WARNING, logger="peft_lalora"):
        trainer.train()
    # Assert: dropped in all 8 rounds, whichever rows Poisson sampling drew (before: only when it drew row 30)
    logged = [log for log in trainer.state.log_history if "round" in log]
    assert [(log["clients"], log["failed_clients"]) for log in logged] == [(1.0, 1.0)] * 8
    assert all(set(log) == PUBLIC_ROUND_KEYS for log in logged)
    assert any(not torch.equal(start[n], v) for n, v in adapter_state(trainer.model).items())  # client 1 trained
    assert trainer.ledger.steps(0) == trainer.ledger.steps(1) == 8 * 2  # a scheduled failure is still charged
    messages = lib_messages(caplog)
    assert "client 0 fails the data check and will be dropped from its rounds" in messages
    assert "`max_position_embeddings`=64" in messages
    assert "client 1" not in messages
    assert not quotes(messages, LONG_LENGTH, BATCH, *([long_row] if long_row else []))


def test_labels_out_of_range_past_the_probed_rows_are_raised(tmp_path):
    data = shard(0).to_dict()
    data["labels"][LONG_ROW] = 7  # two classes
    trainer = federation(tmp_path, [Dataset.from_dict(data)])
    with pytest.raises(ClientDataError, match=r"outside \[0, 2\) .*`num_labels`=2") as caught:
        trainer.train()
    assert trainer.ledger.steps(0) == 0
    assert not quotes(str(caught.value), 7, LONG_ROW)


def test_a_token_id_beyond_the_vocabulary_past_the_probed_rows_is_raised(tmp_path):
    data = shard(0).to_dict()
    data["input_ids"][LONG_ROW][3] = 4321  # vocabulary of 100
    trainer = federation(tmp_path, [Dataset.from_dict(data)])
    with pytest.raises(ClientDataError, match=r"vocabulary \[0, 100\)") as caught:
        trainer.train()
    assert trainer.ledger.steps(0) == 0
    assert not quotes(str(caught.value), 4321, LONG_ROW)


# ----- a failure inside a round ---------------------------------------------------------------------------------
@pytest.mark.parametrize("log_private_metrics", [False, True])
def test_a_client_failing_inside_a_round_reveals_only_that_it_failed(
    tmp_path, caplog, monkeypatch, log_private_metrics
):
    # Prepare: client 0's local round raises the kind of error a model raises, quoting what it saw
    real = trainer_module.client_update

    def model_error(**kwargs):
        if kwargs["client"] == 0:
            raise RuntimeError(
                f"The size of tensor a ({LONG_LENGTH}) must match the size of tensor b (64), batch {BATCH}"
            )
        return real(**kwargs)

    monkeypatch.setattr(trainer_module, "client_update", model_error)
    trainer = make_trainer(tmp_path, clients_per_round=4, num_rounds=1, log_private_metrics=log_private_metrics)
    # Execute
    with caplog.at_level(logging.WARNING, logger="peft_lalora"):
        trainer.train()
    # Assert: the failure is released (and charged), its text only on request
    log = next(entry for entry in trainer.state.log_history if "round" in entry)
    assert log["failed_clients"] == 1.0 and log["clients"] == 3.0
    assert trainer.ledger.steps(0) == 2
    messages = lib_messages(caplog)
    assert "round 0: client 0 failed and was dropped: RuntimeError" in messages
    assert quotes(messages + str(trainer.state.log_history), LONG_LENGTH, BATCH) == log_private_metrics


# ----- logs and results under DP ---------------------------------------------------------------------------------
def test_a_dp_run_logs_and_returns_no_noise_free_training_statistic_by_default(tmp_path, capsys):
    trainer = make_trainer(tmp_path, num_rounds=2)
    out = trainer.train()
    logged = [log for log in trainer.state.log_history if "round" in log]
    assert len(logged) == 2 and all(set(log) == PUBLIC_ROUND_KEYS for log in logged)
    assert not any(PRIVATE_ROUND_KEYS & set(log) for log in trainer.state.log_history)
    assert math.isnan(out.training_loss)
    assert "train_loss" not in out.metrics and set(out.metrics) == {"train_runtime", "epsilon"}
    printed = capsys.readouterr().out  # the Trainer's printer callback (disable_tqdm=True) writes the logs
    assert "'epsilon'" in printed and "loss" not in printed and "dropped" not in printed


@pytest.mark.parametrize("dp", [True, False])
def test_training_statistics_are_logged_on_request_or_without_dp(tmp_path, dp):
    overrides = {"log_private_metrics": True} if dp else {"dp": False}
    trainer = make_trainer(tmp_path, num_rounds=2, **overrides)
    out = trainer.train()
    logged = [log for log in trainer.state.log_history if "round" in log]
    assert all(PRIVATE_ROUND_KEYS <= set(log) for log in logged)
    assert all(log["sampled_examples"] > 0 and log["dropped_examples"] == 0 for log in logged)
    assert math.isfinite(out.training_loss) and out.training_loss == out.metrics["train_loss"]
    assert out.training_loss == pytest.approx(sum(log["loss"] for log in logged) / 2, rel=1e-12)


def test_log_private_metrics_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigError, match="`log_private_metrics` must be a bool"):
        toy_args(tmp_path, log_private_metrics="yes")


def test_log_private_metrics_is_not_a_flower_run_setting():
    # a Flower node decides on its own (`share-training-metrics`): the server's run config cannot turn it on
    settings = pytest.importorskip("peft_lalora.owner.run_config")
    with pytest.raises(ConfigError, match="log-private-metrics"):
        settings.federated_args({"log-private-metrics": True, "noise-multiplier": 1.0})
    assert settings.federated_args({"noise-multiplier": 1.0}).log_private_metrics is False
