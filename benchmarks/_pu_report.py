"""Markdown table and plot of `privacy_utility.py`'s runs (final phase: mean and std of test accuracy over seeds)."""

from __future__ import annotations

import os
import shlex
import statistics
import sys
from collections import defaultdict

from peft_lalora.tuner.methods import METHODS

LABELS = {
    **{name: METHODS[name].title for name in ("dplora", "ffa", "rolora", "lalora_nofilter", "lalora")},
    "headonly": "DP linear probe (head only)",
}  # titles: the methods table
LABELS.update({f"{m}@user": f"{title}, user-level" for m, title in LABELS.items()})  # --units user
LABELS["nonprivate"] = "LoRA (non-private)"
METHOD_ORDER = tuple(LABELS)
PHASES = {"final": "learning rate chosen per method", "final_shared": "one learning rate shared by the methods"}
# two-sided 95 % Student t quantiles t_{0.975, df} for df = 1..10 (standard table values)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def final_groups(runs, phase: str = "final") -> dict:
    groups = defaultdict(list)
    for run in runs:
        if run["phase"] == phase:
            groups[(run["method"], run["epsilon_target"])].append(run)
    return groups


def ci95(values) -> float:
    """Half-width of the 95 % confidence interval of the mean (Student t; nan below two values)."""
    n = len(values)
    return T975[n - 1] * statistics.stdev(values) / n**0.5 if 1 < n <= 11 else float("nan")


def mean_std(values) -> tuple:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


BASELINES = ("dplora", "ffa", "rolora")


def paired(groups, a, b, eps, eps_b="same") -> tuple | None:
    """Mean and std over seeds of accuracy(a) - accuracy(b), paired by seed (same clients, same head init), and
    the 95 % interval's half-width; `eps_b` is b's epsilon when it differs (None for non-private)."""
    by_seed = {r["seed"]: r["test_accuracy"] for r in groups.get((b, eps if eps_b == "same" else eps_b), [])}
    diffs = [r["test_accuracy"] - by_seed[r["seed"]] for r in groups.get((a, eps), []) if r["seed"] in by_seed]
    return mean_std(diffs) + (len(diffs), ci95(diffs)) if diffs else None


def diff_cell(d) -> str:
    """A paired difference in points: mean ± std (n), [95 % interval]."""
    if d is None:
        return ""
    lo, hi = 100 * (d[0] - d[3]), 100 * (d[0] + d[3])
    return f"{100 * d[0]:+.2f} ± {100 * d[1]:.2f} (n={d[2]}, 95 % CI [{lo:+.2f}, {hi:+.2f}])"


def comparison_lines(groups, epsilons) -> list:
    """The issue's two questions, per ε: LA-LoRA minus the best baseline (by mean), and the gap to non-private."""
    lines = [
        "| ε | best baseline | LA-LoRA − best baseline (paired by seed) | LA-LoRA − LA-LoRA w/o filter | "
        "non-private − LA-LoRA |",
        "|---|---|---|---|---|",
    ]
    nonprivate = groups.get(("nonprivate", None))
    for eps in epsilons:
        present = [m for m in BASELINES if (m, eps) in groups]
        if ("lalora", eps) not in groups or not present:
            continue
        best = max(present, key=lambda m: mean_std([r["test_accuracy"] for r in groups[(m, eps)]])[0])
        cells = [diff_cell(paired(groups, "lalora", other, eps)) for other in (best, "lalora_nofilter")]
        gap = ""
        if nonprivate:
            gap = f"{100 * (mean_std([r['test_accuracy'] for r in nonprivate])[0] - mean_std([r['test_accuracy'] for r in groups[('lalora', eps)]])[0]):.2f}"
        lines.append(f"| {eps:g} | {LABELS[best]} | {cells[0]} | {cells[1]} | {gap} |")
    return lines if len(lines) > 2 else []


def write_table(path, command, settings, runs, wall) -> str:
    lines = [f"Command: `{command}`", "", f"Wall time: {wall / 60:.1f} min."]
    if str(settings.get("mechanism", "dp")).startswith("authors"):
        lines += [
            "",
            f"**NOT differentially private.** Mechanism: {settings['mechanism']}. The ε columns name the DP "
            "run whose σ this mechanism uses; no ε is guaranteed.",
        ]
    for phase in PHASES:
        if any(r["phase"] == phase for r in runs):
            lines += ["", f"### Final runs, {PHASES[phase]}", ""] + table_lines(runs, settings, phase)
    lines += [
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "client_sizes"),
        f"client sizes: {settings.get('client_sizes')}",
        "",
    ]
    text = "\n".join(lines)
    with open(path, "w") as handle:
        handle.write(text)
    return text


def table_lines(runs, settings, phase) -> list:
    groups = final_groups(runs, phase)
    epsilons = sorted({e for (_, e) in groups if e is not None})
    methods = [m for m in LABELS if any(k[0] == m for k in groups)]
    how = (
        "one learning rate for every private method, the best mean validation accuracy over them"
        if phase == "final_shared"
        else "learning rate chosen per cell"
    )
    lines = [
        f"Test accuracy, mean ± std over seeds {settings['seeds']} ({how} from {settings['lr_grid']} by "
        f"validation accuracy, seed {settings['tune_seed']}"
        + (
            f" at ε = {settings['tune_epsilon']:g} (reused at the other ε)"
            if settings.get("tune_epsilon") is not None
            else " at each ε"
        )
        + "); in brackets the chosen learning rate.",
        "",
    ]
    head = "| method | " + " | ".join(f"ε = {e:g}" for e in epsilons) + " | non-private |"
    lines += [head, "|" + "---|" * (len(epsilons) + 2)]
    for m in methods:
        cells = []
        for e in epsilons + [None]:
            group = groups.get((m, e))
            if not group:
                cells.append("")
                continue
            mu, sd = mean_std([r["test_accuracy"] for r in group])
            cells.append(f"{100 * mu:.2f} ± {100 * sd:.2f} ({group[0]['learning_rate']:g})")
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    sigmas = {}
    for (m, e), group in groups.items():
        if e is not None and not m.endswith("@user"):
            sigmas[e] = group[0]["noise_multiplier"]
    reached = {}  # the runs of a mechanism that is not DP have no epsilon
    for e in epsilons:
        spent = [r["epsilon_reached"] for (_, ee), g in groups.items() if ee == e for r in g]
        spent = [x for x in spent if x is not None]
        reached[e] = f"reached {max(spent):.3f}" if spent else "no ε reached (not DP)"
    lines += [""] + comparison_lines(groups, epsilons) + [""] + probe_lines(groups, epsilons)
    lines += unit_lines(groups, epsilons)
    lines += [
        "",
        "Noise multiplier σ and the largest ε reached by any client (δ = "
        f"{next((r['delta'] for r in runs if r.get('delta')), None)}): "
        + ", ".join(f"ε={e:g}: σ={sigmas[e]:.3f}, {reached[e]}" for e in epsilons),
        "",
    ]
    return lines


def unit_lines(groups, epsilons) -> list:
    """The user-level arm (`--units user`): per method and ε, user-level minus example-level accuracy (paired by
    seed), and the σ each unit needs for the same ε (users are sampled at a higher rate: fewer of them)."""
    rows = []
    for m in [m for m in LABELS if m.endswith("@user")]:
        base = m[: -len("@user")]
        for eps in epsilons:
            if (m, eps) in groups and (base, eps) in groups:
                sigma = (groups[(base, eps)][0]["noise_multiplier"], groups[(m, eps)][0]["noise_multiplier"])
                users = groups[(m, eps)][0].get("users_per_client") or []
                rows.append(
                    f"| {LABELS[base]} | {eps:g} | {diff_cell(paired(groups, m, base, eps))} | {sigma[0]:.3f} | "
                    f"{sigma[1]:.3f} | {min(users, default='')}–{max(users, default='')} |"
                )
    if not rows:
        return []
    return [
        "",
        "User-level minus example-level DP at the same ε (users are sampled at q = B / users, one example each):",
        "",
        "| method | ε | user − example (paired by seed) | σ example | σ user | users per client |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def probe_lines(groups, epsilons) -> list:
    """Per ε: the best LoRA method (by mean) minus the DP linear probe, and non-private minus that method."""
    if not any(m == "headonly" for (m, _) in groups):
        return []
    lines = [
        "| ε | best LoRA method | best − DP linear probe (paired by seed) | non-private − best (paired) |",
        "|---|---|---|---|",
    ]
    for eps in epsilons:
        present = [m for m in LABELS if m not in ("headonly", "nonprivate") and (m, eps) in groups]
        if ("headonly", eps) not in groups or not present:
            continue
        best = max(present, key=lambda m: mean_std([r["test_accuracy"] for r in groups[(m, eps)]])[0])
        lines.append(
            f"| {eps:g} | {LABELS[best]} | {diff_cell(paired(groups, best, 'headonly', eps))} | "
            f"{diff_cell(paired(groups, 'nonprivate', best, None, eps_b=eps))} |"
        )
    return lines if len(lines) > 2 else []


def plot(path, runs, settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = final_groups(runs, "final" if any(r["phase"] == "final" for r in runs) else "final_shared")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"dplora": "o", "ffa": "s", "rolora": "^", "lalora_nofilter": "v", "lalora": "D", "headonly": "x"}
    for i, m in enumerate(markers):
        points = sorted(
            (e, mean_std([r["test_accuracy"] for r in g]))
            for (mm, e), g in groups.items()
            if mm == m and e is not None
        )
        if not points:
            continue
        x = [e * (1 + 0.015 * (i - 2)) for e, _ in points]  # small horizontal offsets keep error bars apart
        ax.errorbar(
            x,
            [100 * p[1][0] for p in points],
            yerr=[100 * p[1][1] for p in points],
            marker=markers[m],
            capsize=3,
            label=LABELS[m],
            linewidth=2.2 if m == "lalora" else 1.3,
        )
    if ("nonprivate", None) in groups:
        mu, sd = mean_std([r["test_accuracy"] for r in groups[("nonprivate", None)]])
        ax.axhline(100 * mu, color="black", linestyle="--", label=f"LoRA non-private ({100 * mu:.1f})")
        ax.axhspan(100 * (mu - sd), 100 * (mu + sd), color="black", alpha=0.08)
    epsilons = sorted({e for (_, e) in groups if e is not None})
    ax.set_xticks(epsilons)
    ax.set_xticklabels([f"{e:g}" for e in epsilons])
    ax.set_xlabel("target ε (sample-level, per client)")
    ax.set_ylabel("test accuracy (%)")
    layers = settings.get("layers")
    depth = f" ({layers} layer{'s' if layers != 1 else ''})" if layers else ""
    ax.set_title(
        f"{settings['model'].split(' (')[0].split('/')[-1]}{depth} on "
        f"{settings['task'].split(' (')[0]}, {settings['num_clients']} clients, {settings['rounds']} rounds x "
        f"{settings['local_steps']} steps" + (", head frozen" if settings.get("head") == "frozen" else ""),
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def command_line(script: str, argv=None) -> str:
    """The command that ran `script` (a benchmark's `__file__`) with `argv` (default: this process's arguments),
    as typed from the repository root: `python benchmarks/<name>.py <arguments>`. The interpreter's path is the
    machine's, not part of the command."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", os.path.relpath(os.path.abspath(script), root), *map(shlex.quote, args)])


def require_matplotlib() -> None:
    """Stop before any run when the plot could not be drawn at the end."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError(
            "This benchmark ends with a plot, drawn by matplotlib, which is not installed: "
            "install the `plot` extra (`pip install '.[plot]'`) or `pip install matplotlib`.",
            name="matplotlib",
        ) from None
