"""The paper's methods, written once: each is a schedule of the same adapter (`alternation`) plus the low-pass
filter switch. `LALoraConfig.for_method`, the config's help and errors, the model card and the recipes' `--method`
read this table; tests/test_methods.py checks the README's table against it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One method: its `--method` name, its title in the paper, its factor schedule, its filter switch, and the
    sentence the model card uses to describe it."""

    name: str
    title: str
    alternation: str
    lowpass: bool
    description: str


METHODS = {
    method.name: method
    for method in (
        Method(
            "lalora",
            "LA-LoRA",
            "local",
            True,
            "each client alternates the trainable LoRA factor inside its local steps (B, then A, ...) and smooths the "
            "active factor's noisy gradient with a Gaussian low-pass filter.",
        ),
        Method(
            "lalora_nofilter",
            "LA-LoRA without filter",
            "local",
            False,
            "each client alternates the trainable LoRA factor inside its local steps (B, then A, ...), without the "
            "low-pass filter (ablation).",
        ),
        Method(
            "rolora",
            "RoLoRA",
            "round",
            False,
            "all clients train B in one round and A in the next, alternating by round.",
        ),
        Method(
            "ffa", "FFA-LoRA", "freeze_a", False, "only B trains; A keeps its random initialisation and is never sent."
        ),
        Method("dplora", "DP-LoRA", "none", False, "A and B train together at every step (FedAvg-LoRA)."),
    )
}
ALTERNATIONS = tuple(dict.fromkeys(method.alternation for method in METHODS.values()))  # local, round, freeze_a, none


def method_of(alternation: str, lowpass: bool | None = None) -> Method | None:
    """The method a schedule runs: the first with this `alternation` (its primary method, e.g. LA-LoRA for
    "local"), or, with `lowpass`, the one with this filter switch where one exists (a schedule with the filter
    switched against its method's default keeps the method's name). None for an unknown alternation."""
    candidates = [method for method in METHODS.values() if method.alternation == alternation]
    return next((method for method in candidates if method.lowpass == lowpass), candidates[0] if candidates else None)


def alternation_titles() -> list[str]:
    """["'local' (LA-LoRA)", "'round' (RoLoRA)", ...]: each alternation with the title of its primary method."""
    return [f"'{alternation}' ({method_of(alternation).title})" for alternation in ALTERNATIONS]
