"""One table across the privacy-utility arms of a track: the library's DP methods with flat clipping, with
clipping groups, the DP linear probe, non-private LoRA, and the authors' released mechanism (NOT differentially
private) at the same sigma; paired differences (same seeds: same clients, head init and batches) with 95 % intervals.

    python benchmarks/pu_summary.py                 # text: the files of TEXT_ARMS in results/
    python benchmarks/pu_summary.py --track vision  # vision: the files of VISION_ARMS
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _pu_report import LABELS, METHOD_ORDER, diff_cell, final_groups, mean_std, paired  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# arm suffix -> (file stem, phase, label, what a row's method name gets appended), per track
_AUTHORS = ("final", "authors' mechanism (NOT DP), lr per method", " (authors, NOT DP)")
_AUTHORS_SHARED = ("final_shared", "authors' mechanism (NOT DP), one lr", " (authors, NOT DP, one lr)")


def _flat(stem: str, row: str = "") -> tuple:
    """An arm of the library's DP-SGD with flat clipping; `row` names what differs from the default track."""
    return (stem, "final", "DP, flat clip C" + row, row)


TEXT_ARMS = {
    "": _flat("privacy_utility"),
    "@groups": ("privacy_utility_groups", "final", "DP, clipping groups", " + groups"),
    "@authors": ("privacy_utility_authors", *_AUTHORS),
    "@authors-shared": ("privacy_utility_authors", *_AUTHORS_SHARED),
    "@r15": _flat("privacy_utility_15rounds", ", 15 rounds"),
    "@b128": _flat("privacy_utility_batch128", ", batch 128"),
    "@b128r15": _flat("privacy_utility_batch128_15rounds", ", batch 128, 15 rounds"),
}
VISION_ARMS = {
    "": _flat("privacy_utility_vision"),
    "@s5": _flat("privacy_utility_vision_eps1_5seeds", ", 5 seeds"),
    "@authors": ("privacy_utility_vision_authors", *_AUTHORS),
    "@authors-shared": ("privacy_utility_vision_authors", *_AUTHORS_SHARED),
}
_ROW_SUFFIX = {suffix[1:]: arm[3] for arms in (TEXT_ARMS, VISION_ARMS) for suffix, arm in arms.items()}
# the schedules compared with their own non-private reference: (name, DP arms, the arm holding non-private and probe)
TEXT_SCHEDULES = (
    ("5 rounds", ("", "@groups"), ""),
    ("15 rounds", ("@r15",), "@r15"),
    ("5 rounds, batch 128", ("@b128",), "@b128"),
    ("15 rounds, batch 128", ("@b128r15",), "@b128r15"),
)
TRACKS = {  # track -> (arms, schedules, the summary file's stem)
    "text": (TEXT_ARMS, TEXT_SCHEDULES, "privacy_utility_summary"),
    "vision": (
        VISION_ARMS,
        (("6 rounds", ("",), ""), ("6 rounds, 5 seeds", ("@s5",), "@s5")),
        "privacy_utility_vision_summary",
    ),
}


def load(results: str, arms: dict, schedules: tuple) -> tuple:
    """All arms' final runs in one {(method + arm suffix, epsilon): runs} dict, and each file's settings."""
    groups, settings = {}, {}
    for suffix, (stem, phase, _, _) in arms.items():
        path = os.path.join(results, stem + ".json")
        if not os.path.exists(path):
            continue
        with open(path) as handle:
            saved = json.load(handle)
        settings[stem] = saved["settings"]
        for (method, eps), runs in final_groups(saved["runs"], phase).items():
            if method == "nonprivate" and suffix not in {schedule[2] for schedule in schedules}:
                continue  # each schedule's reference comes from its own file
            groups[(method + suffix, eps)] = runs
    return groups, settings


def label(key: str) -> str:
    method, _, arm = key.partition("@")
    return LABELS[method] + _ROW_SUFFIX[arm]


def cell(groups, key, eps) -> str:
    runs = groups.get((key, eps))
    if not runs:
        return ""
    mu, sd = mean_std([r["test_accuracy"] for r in runs])
    return f"{100 * mu:.2f} ± {100 * sd:.2f} ({runs[0]['learning_rate']:g}, n={len(runs)})"


def summary(groups, settings, track: str = "text") -> str:
    arms, schedules, _ = TRACKS[track]
    epsilons = sorted({e for (_, e) in groups if e is not None})
    dp_keys = [m + s for _, dp_arms, _ in schedules for s in dp_arms for m in METHOD_ORDER if m != "nonprivate"]
    lines = [
        f"# Privacy-utility summary ({track} track)",
        "",
        "Test accuracy (%), mean ± std over seeds (chosen learning rate, number of seeds). Every arm uses the "
        "same clients, seeds and, at each ε and schedule, the same σ; `pu_summary.py` reads the committed "
        "JSONs.",
        "",
        "| arm | " + " | ".join(f"ε = {e:g}" for e in epsilons) + " | non-private |",
        "|" + "---|" * (len(epsilons) + 2),
    ]
    for key in (
        dp_keys
        + [m + s for s in ("@authors", "@authors-shared") for m in METHOD_ORDER]
        + ["nonprivate" + ref for _, _, ref in schedules]
    ):
        if any((key, e) in groups for e in epsilons + [None]):
            lines.append(f"| {label(key)} | " + " | ".join(cell(groups, key, e) for e in epsilons + [None]) + " |")
    lines += [
        "",
        "## The issue's goals, per schedule and ε: the best DP arm (by mean) against its non-private LoRA "
        "and its DP linear probe (paired by seed; points)",
        "",
        "| schedule | ε | best DP arm | non-private − best | best − DP linear probe |",
        "|---|---|---|---|---|",
    ]
    for name, dp_arms, ref in schedules:
        for eps in epsilons:
            present = [
                m + a
                for a in dp_arms
                for m in METHOD_ORDER
                if m not in ("nonprivate", "headonly") and (m + a, eps) in groups
            ]
            if not present:
                continue
            best = max(present, key=lambda k: mean_std([r["test_accuracy"] for r in groups[(k, eps)]])[0])
            lines.append(
                f"| {name} | {eps:g} | {label(best)} | "
                f"{diff_cell(paired(groups, 'nonprivate' + ref, best, None, eps_b=eps))} | "
                f"{diff_cell(paired(groups, best, 'headonly' + ref, eps))} |"
            )
    lines += reproduction(groups, epsilons, arms)
    for stem, s in settings.items():
        lines += ["", f"Settings of `{stem}`: " + ", ".join(f"{k}={v}" for k, v in s.items() if k != "client_sizes")]
    return "\n".join(lines) + "\n"


def reproduction(groups, epsilons, arms: dict) -> list:
    """Part 4: the paper's ordering and filter gain under the library's DP-SGD and under the authors' mechanism."""
    lines = [
        "",
        "## Where the paper's gains come from: LA-LoRA against each baseline, and the filter, per mechanism",
        "",
        "Paired by seed, points, 95 % interval; the paper reports LA-LoRA > RoLoRA > FFA-LoRA > DP-LoRA with "
        "a large filter gain.",
        "",
        "| ε | mechanism | ranking (by mean) | LA-LoRA − DP-LoRA | LA-LoRA − FFA-LoRA | "
        "LA-LoRA − RoLoRA | LA-LoRA − LA-LoRA w/o filter |",
        "|---|---|---|---|---|---|---|",
    ]
    for eps in epsilons:
        for suffix, (_, _, name, _) in arms.items():
            methods = [
                m for m in ("lalora", "rolora", "ffa", "dplora", "lalora_nofilter") if (m + suffix, eps) in groups
            ]
            if "lalora" not in methods or len(methods) < 2:
                continue
            ranking = sorted(
                methods, key=lambda m: -mean_std([r["test_accuracy"] for r in groups[(m + suffix, eps)]])[0]
            )
            cells = [
                diff_cell(paired(groups, "lalora" + suffix, other + suffix, eps))
                for other in ("dplora", "ffa", "rolora", "lalora_nofilter")
            ]
            lines.append(
                f"| {eps:g} | {name} | {' > '.join(LABELS[m] for m in ranking)} | " + " | ".join(cells) + " |"
            )
    return lines if len(lines) > 6 else []


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=RESULTS, help="the folder of the arms' JSON files")
    p.add_argument("--track", choices=sorted(TRACKS), default="text")
    p.add_argument("--out", help="default: <results>/privacy_utility_summary.md (vision: ..._vision_summary.md)")
    opts = p.parse_args(argv)
    arms, schedules, stem = TRACKS[opts.track]
    text = summary(*load(opts.results, arms, schedules), track=opts.track)
    with open(opts.out or os.path.join(opts.results, stem + ".md"), "w") as handle:
        handle.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
