"""The methods are written once (`peft_lalora.tuner.METHODS`): the README's table, the config and the card agree."""

import os

import pytest

from peft_lalora import LALoraConfig
from peft_lalora.hub import render_model_card
from peft_lalora.tuner import ALTERNATIONS, METHODS

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
HEADER = "| method (`--method`) | `alternation` | `lowpass` | what trains when |"


def test_readme_methods_table_is_the_package_table():
    # Prepare: the README's table, from its header to the first line that is no table row
    with open(README, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    start = lines.index(HEADER)
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    # Execute: the table rendered from the package
    expected = [HEADER, "|---|---|---|---|"] + [
        f'| {m.title} (`{m.name}`) | `"{m.alternation}"` | {"on" if m.lowpass else "off"} | {m.description} |'
        for m in METHODS.values()
    ]
    # Assert
    assert lines[start:end] == expected


@pytest.mark.parametrize("name", list(METHODS))
def test_config_and_card_follow_the_table(name):
    method = METHODS[name]
    config = LALoraConfig.for_method(name, r=4, target_modules=["query"], task_type="SEQ_CLS")
    assert (config.alternation, config.lowpass) == (method.alternation, method.lowpass)
    card = render_model_card(
        base_model="tiny",
        adapter_config=config.to_dict(),
        privacy_report=None,
        metrics={},
        federated={"num_clients": 2, "clients_per_round": 1, "num_rounds": 1, "local_steps": 1},
    )
    assert f"**{method.title}**: {method.description}" in card


def test_config_docstring_names_each_alternation_with_its_method():
    for alternation in ALTERNATIONS:
        title = next(m.title for m in METHODS.values() if m.alternation == alternation)
        assert f'`"{alternation}"`: {title}' in LALoraConfig.__doc__
