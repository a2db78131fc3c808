"""What the model card claims: real metrics only, of the last evaluation and its round, the dataset, the base model
(or nothing), the modules trained in full, the `differential-privacy` tag only for a private run, and a warning
for a run whose noise came from a fixed seed."""

import pytest
import yaml
from fed_helpers import accuracy, toy_args, toy_dataset, toy_model

from peft_lalora import FederatedDPTrainer, LALoraConfig
from peft_lalora.hub import render_model_card

REPORT = {
    "epsilon": 1.0,
    "delta": 1e-5,
    "noise_multiplier": 1.2,
    "per_sample_max_grad_norm": 1.0,
    "accountant": "rdp",
    "unit": "one example of one client",
    "dp": True,
    "clients": [{"client": 0, "epsilon": 1.0, "sample_rate": 0.1, "steps": 20}],
}
FEDERATED = {"num_clients": 8, "clients_per_round": 4, "num_rounds": 5, "local_steps": 10}
TRAINER_METRICS = {
    "eval_loss": 0.4321,
    "eval_model_preparation_time": 0.0013,
    "eval_accuracy": 0.8765,
    "eval_runtime": 24.9,
    "eval_samples_per_second": 40.1,
    "eval_steps_per_second": 0.32,
}


def card_kwargs(**overrides):
    config = LALoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS").to_dict()
    kwargs = dict(
        base_model="tiny-roberta",
        adapter_config=config,
        privacy_report=REPORT,
        federated=FEDERATED,
        metrics={"eval_accuracy": 0.8765, "eval_loss": 0.4321},
        dataset="glue/sst2",
    )
    kwargs.update(overrides)
    return kwargs


def front_matter(card: str) -> dict:
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def index_metrics(card: str) -> dict:
    results = front_matter(card)["model-index"][0]["results"]
    return {m["name"]: m["value"] for r in results for m in r["metrics"]}


# -- metrics ---------------------------------------------------------------------------------------------------
def test_runtime_and_speed_are_not_results_and_loss_is_no_model_index_result():
    card = render_model_card(**card_kwargs(metrics=TRAINER_METRICS))
    assert index_metrics(card) == {"eval_accuracy": 0.8765}  # the task metric; a loss is not a benchmark result
    assert "| eval_accuracy | 0.8765 |" in card and "| eval_loss | 0.4321 |" in card
    for name in ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time"):
        assert name not in card


def test_card_names_the_dataset_from_the_arguments(tmp_path):
    trainer = FederatedDPTrainer(
        model=toy_model(), args=toy_args(tmp_path, card_dataset_name="glue/sst2"), train_dataset=toy_dataset()
    )
    card = render_model_card(**trainer.card_context())
    assert front_matter(card)["datasets"] == ["glue/sst2"]


def test_card_reports_the_last_evaluation_and_its_round(tmp_path):
    # Prepare: 3 rounds, evaluated after round 2 only
    args = toy_args(tmp_path, num_rounds=3, eval_rounds=2, save_strategy="no")
    trainer = FederatedDPTrainer(
        model=toy_model(),
        args=args,
        train_dataset=toy_dataset(),
        eval_dataset=toy_dataset(40, seed=1),
        compute_metrics=accuracy,
    )
    trainer.train()
    # Execute / Assert: the round-2 evaluation is not the adapter's: said so, and no model-index claim
    card = render_model_card(**trainer.card_context())
    assert "after round 2 of 3" in card and "not of the final adapter" in card
    assert "model-index" not in front_matter(card)
    # the final adapter evaluated: its metrics, its round, and a model-index
    final = trainer.evaluate()
    card = render_model_card(**trainer.card_context())
    assert "after round 3 of 3" in card and "not of the final adapter" not in card
    assert index_metrics(card) == {"eval_accuracy": final["eval_accuracy"]}


# -- base model and modules_to_save ---------------------------------------------------------------------------
def test_unknown_base_model_is_left_out_not_called_unknown(tmp_path):
    trainer = FederatedDPTrainer(model=toy_model(), args=toy_args(tmp_path), train_dataset=toy_dataset())
    card = render_model_card(**trainer.card_context())  # a model built from a config has no name
    assert "base_model" not in front_matter(card) and "unknown" not in card
    assert "base model was not recorded" in card


def test_modules_to_save_listed_once_in_order():
    config = LALoraConfig(
        r=4,
        target_modules=["query"],
        task_type="SEQ_CLS",
        modules_to_save=["classifier", "pooler", "classifier", "score"],
    ).to_dict()
    card = render_model_card(**card_kwargs(adapter_config=config))
    assert "| modules trained in full (`modules_to_save`) | `classifier`, `pooler`, `score` |" in card


# -- differential-privacy tag and fixed noise seed ------------------------------------------------------------
@pytest.mark.parametrize(
    "report, private",
    [
        (REPORT, True),
        (None, False),
        ({**REPORT, "dp": False}, False),
        ({**REPORT, "noise_multiplier": 0.0, "epsilon": float("inf")}, False),
        ({**REPORT, "secret_randomness": False, "noise_seed_warning": "noise_seed=3 was fixed"}, False),
    ],
)
def test_differential_privacy_tag_only_for_a_private_run(report, private):
    card = render_model_card(**card_kwargs(privacy_report=report))
    assert ("differential-privacy" in front_matter(card)["tags"]) == private
    assert ("with differential privacy" in card) == private


def test_non_private_trainer_card_has_no_differential_privacy_tag(tmp_path):
    trainer = FederatedDPTrainer(model=toy_model(), args=toy_args(tmp_path, dp=False), train_dataset=toy_dataset())
    assert "differential-privacy" not in front_matter(render_model_card(**trainer.card_context()))["tags"]


def test_fixed_noise_seed_card_warns_that_no_guarantee_holds():
    report = {**REPORT, "secret_randomness": False, "noise_seed_warning": "noise_seed=3 was fixed by the user."}
    card = render_model_card(**card_kwargs(privacy_report=report))
    privacy = card.split("## Privacy", 1)[1].split("\n## ", 1)[0]
    assert "> **Warning: no privacy guarantee.**" in privacy and "noise_seed=3 was fixed by the user." in privacy
    assert privacy.index("Warning") < privacy.index("epsilon")  # before the numbers it voids
    for older in (REPORT, {**REPORT, "secret_randomness": True}):  # a report without the key: secret randomness
        assert "Warning: no privacy guarantee" not in render_model_card(**card_kwargs(privacy_report=older))


# -- how to load -----------------------------------------------------------------------------------------------
def test_card_code_loads_the_local_base_the_run_used_and_runs_offline(tmp_path):
    # Prepare: a base saved to a folder (the run's offline copy) whose Hub id is recorded, and its adapter
    import re

    import torch
    from peft import PeftModel, get_peft_model
    from tiny_models import tiny_roberta
    from transformers import AutoModelForSequenceClassification

    from peft_lalora.trainer import local_base_path

    base_dir, adapter_dir = tmp_path / "offline copy", tmp_path / "adapter"
    tiny_roberta().save_pretrained(base_dir)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(base_dir),
        LALoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    with torch.no_grad():  # a nonzero adapter, so that loading it is visible in the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model.peft_config["default"].base_model_name_or_path = "someone/hub-model"
    model.save_pretrained(adapter_dir)
    # Execute
    local = local_base_path(model)
    card = render_model_card(**card_kwargs(base_model="someone/hub-model", base_model_path=local))
    hub_card = render_model_card(**card_kwargs(base_model="someone/hub-model", base_model_path=local, repo_id="u/r"))
    # Assert: the code loads the folder the run used and names the Hub id; a Hub card the other way round
    assert local == str(base_dir)
    snippet = re.search(r"```python\n(import peft_lalora.*?)```", card, re.S).group(1)
    assert f'from_pretrained("{base_dir}")' in snippet and "elsewhere load 'someone/hub-model'" in snippet
    assert 'from_pretrained("someone/hub-model")' in hub_card and repr(str(base_dir)) in hub_card
    # ... and runs offline as written (the adapter folder in place of the placeholder), reproducing the outputs
    namespace = {}
    exec(snippet.replace("<repo_id or local adapter folder>", str(adapter_dir)), namespace)
    assert isinstance(namespace["model"], PeftModel)
    inputs = {"input_ids": torch.tensor([[0, 5, 6, 7, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    model.eval()
    with torch.no_grad():
        assert torch.allclose(namespace["model"].eval()(**inputs).logits, model(**inputs).logits, atol=1e-6)


def test_card_code_loads_the_recorded_base_when_it_is_the_folder_the_run_used():
    card = render_model_card(**card_kwargs(base_model="/data/base", base_model_path="/data/base"))
    assert 'base = AutoModelForSequenceClassification.from_pretrained("/data/base")' in card
    assert "local copy" not in card
