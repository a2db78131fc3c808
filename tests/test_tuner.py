"""LALoraConfig / LALoraModel: injection on every supported architecture, the schedule, freezing, errors."""

import warnings

import pytest
import torch
from peft import get_peft_model
from tiny_models import MODELS, tiny_roberta

import peft_lalora  # noqa: F401  (registers LALORA)
from peft_lalora import ConfigError, LALoraConfig, LALoraModel, LALoraWarning


def make(name="roberta", **kwargs):
    build, targets, task, inputs = MODELS[name]
    kwargs.setdefault("modules_to_save", ["classifier"] if name in ("vit", "swin") else None)
    config = LALoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task, **kwargs)
    return build(), config, inputs()


@pytest.mark.parametrize("name", list(MODELS))
def test_get_peft_model_starts_at_base_outputs(name):
    # Prepare
    base, config, inputs = make(name)
    reference = base(**inputs).logits.detach().clone()
    # Execute
    model = get_peft_model(base, config)
    # Assert
    assert isinstance(model.base_model, LALoraModel)
    assert model.peft_config["default"].peft_type == "LALORA"
    assert any("lora_A" in n for n, _ in model.named_parameters())
    # B starts at zero, so the adapter adds exactly 0; Swin's kernels differ run to run by ~1e-9
    torch.testing.assert_close(model(**inputs).logits, reference, rtol=1e-5, atol=1e-6)


TABLE_PERIOD_1 = {  # (alternation, round, step) -> expected, spelled out by hand
    "local": lambda r, s: {"B"} if s % 2 == 0 else {"A"},
    "round": lambda r, s: {"B"} if r % 2 == 0 else {"A"},
    "freeze_a": lambda r, s: {"B"},
    "none": lambda r, s: {"A", "B"},
}
TABLE_PERIOD_2 = {
    "local": lambda r, s: {"B"} if s in (0, 1, 4, 5) else {"A"},
    "round": lambda r, s: {"B"} if r in (0, 1) else {"A"},
    "freeze_a": lambda r, s: {"B"},
    "none": lambda r, s: {"A", "B"},
}


@pytest.mark.parametrize("period,table", [(1, TABLE_PERIOD_1), (2, TABLE_PERIOD_2)])
@pytest.mark.parametrize("alternation", ["local", "round", "freeze_a", "none"])
def test_trainable_factors_table(alternation, period, table):
    model = get_peft_model(
        tiny_roberta(),
        LALoraConfig(
            r=2, target_modules=["query"], task_type="SEQ_CLS", alternation=alternation, alternation_period=period
        ),
    )
    for round_idx in range(4):
        for step in range(6):
            got = model.base_model.trainable_factors(round_idx, step)
            assert isinstance(got, frozenset)
            assert got == frozenset(table[alternation](round_idx, step)), (round_idx, step)


def test_first_factor_a_swaps_phases():
    model = get_peft_model(tiny_roberta(), LALoraConfig(r=2, target_modules=["query"], first_factor="A"))
    assert [set(model.base_model.trainable_factors(0, s)) for s in range(3)] == [{"A"}, {"B"}, {"A"}]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "optimizer_cls,kwargs",
    [
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
        (torch.optim.SGD, {"lr": 1e-1, "momentum": 0.9, "weight_decay": 0.1}),
    ],
)
@pytest.mark.parametrize("active", ["A", "B"])
def test_inactive_factor_bitwise_unchanged(optimizer_cls, kwargs, active):
    # Prepare: a model whose optimizer has state for both factors (one joint step first)
    base, config, inputs = make("roberta")
    model = get_peft_model(base, config)
    model.train()
    labels = torch.tensor([0, 1, 1])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer_cls(params, **kwargs)
    model(**inputs, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad()
    # Execute
    model.base_model.set_trainable_factors({active})
    before = _snapshot(model)
    for _ in range(10):
        model(**inputs, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    # Assert
    inactive = "B" if active == "A" else "A"
    after = dict(model.named_parameters())
    for name, value in before.items():
        if f"lora_{inactive}" in name or "lora_" not in name and "classifier" not in name:
            assert torch.equal(after[name].detach(), value), name
            assert after[name].grad is None
        elif f"lora_{active}" in name or "modules_to_save" in name:
            assert not torch.equal(after[name].detach(), value), f"{name} should train in phase {active}"
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            assert param.requires_grad == (f".lora_{active}." in name), name


def test_head_trains_in_every_phase():
    model = get_peft_model(tiny_roberta(), LALoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    for factors in ({"A"}, {"B"}, {"A", "B"}):
        model.base_model.set_trainable_factors(factors)
        head = [p for n, p in model.named_parameters() if "modules_to_save" in n]
        assert head and all(p.requires_grad for p in head)


def test_factor_parameters_follow_adapters_added_and_deleted():
    # Prepare: one adapter on the 2 query layers
    model = get_peft_model(tiny_roberta(), LALoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    tuner = model.base_model

    def weights(adapter):
        return [p for n, p in model.named_parameters() if f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n]

    assert [f for f, _ in tuner.factor_parameters()] == ["A", "B", "A", "B"]
    # Execute: add a second adapter, delete it, add one of the same name on other layers
    model.add_adapter("other", LALoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    first = tuner.factor_parameters("other")
    model.delete_adapter("other")
    model.add_adapter("other", LALoraConfig(r=2, target_modules=["value"], task_type="SEQ_CLS"))
    # Assert: each answer names the adapter's current weights, in module order
    assert len(first) == 8
    assert [id(p) for _, p in tuner.factor_parameters("other")] == [id(p) for p in weights("other")]
    assert [id(p) for _, p in tuner.factor_parameters("default")] == [id(p) for p in weights("default")]


def test_freeze_a_refuses_training_a():
    model = get_peft_model(tiny_roberta(), LALoraConfig(r=2, target_modules=["query"], alternation="freeze_a"))
    with pytest.raises(ConfigError, match="freeze_a"):
        model.base_model.set_trainable_factors({"A"})
    with pytest.raises(ConfigError, match="`factors`"):
        model.base_model.set_trainable_factors({"C"})


def test_config_defaults_and_methods():
    assert LALoraConfig().lowpass is True
    assert LALoraConfig(alternation="round").lowpass is False
    assert LALoraConfig(alternation="none", lowpass=True).lowpass is True
    assert LALoraConfig.for_method("ffa").alternation == "freeze_a"
    assert LALoraConfig.for_method("lalora_nofilter").lowpass is False


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, "`r` must be > 0, got 0"),
        ({"r": -2}, "`r` must be > 0, got -2"),
        ({"lora_alpha": 0}, "`lora_alpha` must be > 0"),
        ({"lora_alpha": -1.5}, "`lora_alpha` must be > 0"),
        ({"alternation": "sometimes"}, "`alternation` must be one of .*'sometimes'"),
        ({"alternation_period": 0}, "`alternation_period` must be an integer >= 1, got 0"),
        ({"first_factor": "C"}, "`first_factor` must be 'A' or 'B'"),
        ({"lowpass_kernel": ()}, "`lowpass_kernel` must not be empty"),
        ({"lowpass_kernel": (1, -4, 1)}, "non-negative"),
        ({"lowpass_kernel": (0, 0, 0)}, "positive sum"),
        ({"lowpass_kernel": (1, 1)}, "odd length"),
    ],
)
def test_config_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LALoraConfig(**kwargs)


def test_target_modules_matching_nothing_lists_candidates():
    with pytest.raises(ConfigError, match=r"matched no module.*'query'.*'value'"):
        get_peft_model(tiny_roberta(), LALoraConfig(r=2, target_modules=["q_proj"]))


def test_target_modules_partly_matching_warns_naming_the_unmatched():
    # stock peft adapts `query` alone without a word; the typo must be named
    with pytest.warns(LALoraWarning, match=r"\['no_such_module'\] matched no module.*only \['query'\] get adapters"):
        model = get_peft_model(tiny_roberta(), LALoraConfig(r=2, target_modules=["query", "no_such_module"]))
    adapted = {n.rsplit(".", 1)[-1] for n in model.base_model.targeted_module_names}
    assert adapted == {"query"}


def test_target_modules_all_matching_do_not_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(tiny_roberta(), LALoraConfig(r=2, target_modules=["query", "value"]))
    assert not [w for w in caught if issubclass(w.category, LALoraWarning)]
    assert {n.rsplit(".", 1)[-1] for n in model.base_model.targeted_module_names} == {"query", "value"}


def test_registration_is_idempotent():
    import peft.mapping as mapping

    before = dict(mapping.PEFT_TYPE_TO_TUNER_MAPPING)
    peft_lalora.register()
    peft_lalora.register()
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING == before
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["LALORA"] is LALoraConfig
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["LALORA"] == "lora_"
