"""Model cards for LA-LoRA adapters: README.md with YAML front matter (huggingface_hub's `ModelCardData`). The text
is `card_template.md` (package data; `model_cards/template.md` links to it), a `string.Template`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import string
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from ..atomic import atomic_write_bytes
from ..errors import ConfigError
from ..privacy.report import PrivacyReport
from ..tuner.methods import ALTERNATIONS, method_of
from .card_client import client_level_text

TEMPLATE_PATH = Path(__file__).resolve().parent / "card_template.md"
TAGS = ["peft", "lalora", "lora", "differential-privacy", "federated-learning"]
DP_TAG = "differential-privacy"  # only on the card of a private run (DP with noise from secret randomness)
# Trainer.evaluate()'s timing entries: not results. A loss is shown but is no model-index result (as transformers'
# own cards: a benchmark result is a task metric such as accuracy).
NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "jit_compilation_time")
NOT_INDEX_METRICS = ("loss",)
FEDERATED_KEYS = ("num_clients", "clients_per_round", "num_rounds", "local_steps")
CALIBRATED_FOR = {  # a report's `sigma_calibration` -> what sigma was calibrated for
    "schedule": "each client's scheduled steps",
    "worst_case": "a client in every round",
    "given": "(sigma given explicitly)",
}
# peft task_type / pipeline task -> (pipeline task for the model-index, transformers auto class)
TASKS = {
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification"),
    "SEQ_2_SEQ_LM": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoModel"),
}
AUTO_CLASS_BY_TASK = {task: auto for task, auto in TASKS.values()}
AUTO_CLASS_BY_TASK["image-classification"] = "AutoModelForImageClassification"


def render_model_card(
    *,
    base_model: str | None,
    adapter_config: dict,
    privacy_report: dict | None,
    federated: dict,
    metrics: dict,
    dataset: str | None = None,
    task: str | None = None,
    repo_id: str | None = None,
    eval_round: int | None = None,
    adapter_round: int | None = None,
    data_format: str | None = None,
    base_model_path: str | None = None,
) -> str:
    """
    README.md text for an LA-LoRA adapter: YAML front matter (model-index with `metrics` as results) and sections on
    the method, the adapter, the federated setup, the privacy guarantee (`privacy_report=None`: trained without DP),
    the results, loading and citation. `adapter_config`: its `adapter_config.json` as a dict (or an
    `LALoraConfig`); `federated`: `FEDERATED_KEYS`, optionally `partition` or `dirichlet_alpha`; `metrics`: names
    to numbers (timings are dropped). `eval_round` / `adapter_round` (default `num_rounds`): results of an earlier
    round than the adapter's are said to be so and are no model-index claim. `data_format` becomes a "Training
    data" section. `base_model_path`: the local folder the run loaded its base from when that is not `base_model`
    (the loading code names both, loading from the folder unless the card is for a Hub repo `repo_id`).
    """
    if base_model is not None and (not isinstance(base_model, str) or not base_model):
        raise ConfigError(
            f"`base_model` must be a non-empty model id or path (or None when not recorded), got {base_model!r}."
        )
    config = _adapter_config_dict(adapter_config)
    metrics = {k: v for k, v in _check_metrics(metrics).items() if _metric_kind(k) not in NOT_METRICS}
    task = task or TASKS.get(str(config.get("task_type")), (None, None))[0]
    title = (
        repo_id.split("/")[-1] if repo_id else f"LA-LoRA adapter for {base_model}" if base_model else "LA-LoRA adapter"
    )
    kind = "Causal-LM (text-generation) LoRA adapter" if task == "text-generation" else "LoRA adapter"
    values = {
        "base_model_text": f"`{base_model}`" if base_model else "not recorded",
        "adapter_for": f"{kind} for `{base_model}`" if base_model else f"{kind} (its base model was not recorded)",
        "data_section": f"## Training data\n\n{data_format.strip()}\n\n" if data_format else "",
        **_base_load(base_model, base_model_path, repo_id),
        "repo_id": repo_id or "<repo_id or local adapter folder>",
        "title": title,
        "auto_class": AUTO_CLASS_BY_TASK.get(task, "AutoModel"),
        "task_type": f"`{config['task_type']}`" if config.get("task_type") else "not set",
    }
    values.update(_method_values(config))
    values.update(_federated_values(federated))
    privacy_report = None if privacy_report is None else PrivacyReport.from_dict(privacy_report)
    status = privacy_status(privacy_report)
    client_text = client_level_text(privacy_report)
    values["privacy_section"] = _privacy_section(privacy_report) + client_text
    values["dp_clause"] = {
        "private": " with differential privacy",
        "fixed_seed": " with DP-SGD noise from a fixed seed (no privacy guarantee)",
    }.get(status, " with client-level differential privacy" if client_text else " without differential privacy")
    adapter_round = federated["num_rounds"] if adapter_round is None else adapter_round
    final = eval_round is None or eval_round == adapter_round
    values["metrics_section"] = _metrics_section(metrics, dataset, eval_round, adapter_round, federated["num_rounds"])
    index_metrics = {k: v for k, v in metrics.items() if _metric_kind(k) not in NOT_INDEX_METRICS} if final else {}
    values["front_matter"] = _front_matter(
        base_model, index_metrics, dataset, task, title, private=status == "private"
    )
    return string.Template(TEMPLATE_PATH.read_text(encoding="utf-8")).substitute(values)  # package data


def _base_load(base_model: str | None, local: str | None, repo_id: str | None) -> dict:
    """The `from_pretrained` argument of the card's loading code and a comment line naming the other source when
    the run loaded its base from a local folder that is not `base_model` (the code must run where the run ran)."""
    if not local or local == base_model:
        return {"base_model_load": base_model or "<the base model's id or path>", "base_load_comment": ""}
    if not base_model:
        load, comment = local, "the local folder this run loaded its base from"
    elif repo_id:  # a Hub card: the Hub id, and where the run found it
        load, comment = base_model, f"the run loaded this base from its local copy {local!r}"
    else:
        load, comment = local, f"the local copy of {base_model!r} this run loaded (offline); elsewhere load "
        comment += f"{base_model!r} from the Hub"
    return {"base_model_load": load, "base_load_comment": f"# {comment}\n"}


def privacy_status(report: PrivacyReport | dict | None) -> str:
    """ "private" (DP with noise from secret randomness), "fixed_seed" (the noise can be re-created: no guarantee),
    "no_noise" (noise_multiplier 0: epsilon = inf) or "none" (trained without DP)."""
    report = None if report is None else PrivacyReport.from_dict(report)
    if report is None or not report.dp:
        return "none"
    if not report.noise_multiplier > 0:
        return "no_noise"
    if report.fixed_seed:
        return "fixed_seed"
    return "private"


def write_model_card(folder: str, **kwargs) -> str:
    """
    Render the card (see `render_model_card`) and write it atomically to `folder/README.md`; returns its path.
    `adapter_config` defaults to `folder/adapter_config.json`, `base_model` to its `base_model_name_or_path`, and
    `privacy_report` to `folder/privacy_report.json` (pass `privacy_report=None` explicitly for a non-private run).
    """
    if not os.path.isdir(folder):
        raise ConfigError(f"`folder` must be an existing adapter folder, got {folder!r}. Save the adapter first.")
    if "adapter_config" not in kwargs:
        kwargs["adapter_config"] = _read_json(os.path.join(folder, "adapter_config.json"), "adapter_config")
    if "base_model" not in kwargs:
        kwargs["base_model"] = _adapter_config_dict(kwargs["adapter_config"]).get("base_model_name_or_path")
        if not kwargs["base_model"]:
            raise ConfigError(
                "`base_model` was not given and the adapter config has no `base_model_name_or_path`; "
                "pass `base_model=` (the Hub id of the model the adapter was trained on)."
            )
    if "privacy_report" not in kwargs:
        fix = "pass the run's privacy report, or `privacy_report=None` for a run trained without differential privacy"
        kwargs["privacy_report"] = _read_json(os.path.join(folder, "privacy_report.json"), "privacy_report", fix)
    text = render_model_card(**kwargs)
    path = os.path.join(folder, "README.md")
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


# -- helpers -----------------------------------------------------------------------------------------------
def _read_json(path: str, name: str, fix: str | None = None) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        fix = fix or f"pass `{name}=` explicitly"
        raise ConfigError(f"`{name}` was not given and {path!r} does not exist; {fix}.") from exc


def _adapter_config_dict(adapter_config) -> dict:
    if hasattr(adapter_config, "to_dict"):
        adapter_config = adapter_config.to_dict()
    if not isinstance(adapter_config, dict):
        raise ConfigError(
            f"`adapter_config` must be a dict (adapter_config.json) or an LALoraConfig, got "
            f"{type(adapter_config).__name__}."
        )
    missing = [k for k in ("r", "lora_alpha", "target_modules", "alternation") if k not in adapter_config]
    if missing:
        raise ConfigError(
            f"`adapter_config` must hold {missing} (an LA-LoRA adapter_config.json), got keys "
            f"{sorted(adapter_config)}. Pass the LALORA adapter's config, not a stock LoRA export."
        )
    return adapter_config


def _method_values(config: dict) -> dict:
    alternation = config["alternation"]
    if method_of(alternation) is None:
        raise ConfigError(f"`adapter_config['alternation']` must be one of {ALTERNATIONS}, got {alternation!r}.")
    lowpass = method_of(alternation).lowpass if config.get("lowpass") is None else bool(config["lowpass"])
    method = method_of(alternation, lowpass)
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    return {
        "method_name": method.title,
        "method_description": method.description,
        "alternation": alternation,
        "alternation_period": config.get("alternation_period", 1),
        "first_factor": config.get("first_factor", "B"),
        "lowpass": "on" if lowpass else "off",
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "target_modules": ", ".join(f"`{t}`" for t in targets),
        "modules_to_save": ", ".join(f"`{m}`" for m in dict.fromkeys(_as_list(config.get("modules_to_save"))))
        or "none",
    }


def _federated_values(federated: dict) -> dict:
    if not isinstance(federated, dict):
        raise ConfigError(f"`federated` must be a dict with {FEDERATED_KEYS}, got {type(federated).__name__}.")
    missing = [k for k in FEDERATED_KEYS if federated.get(k) is None]
    if missing:
        raise ConfigError(f"`federated` must hold {list(FEDERATED_KEYS)}; missing {missing} in {federated!r}.")
    partition = federated.get("partition")
    if partition is None and federated.get("dirichlet_alpha") is not None:
        partition = f"Dirichlet, alpha = {federated['dirichlet_alpha']}"
    return {**{k: federated[k] for k in FEDERATED_KEYS}, "partition": partition or "not reported"}


def _privacy_section(report: PrivacyReport | None) -> str:
    if report is None or not report.dp:
        if client_level_text(report):
            return "**No sample-level DP** (`dp=False`): each client's local training is not private on its own."
        return (
            "This adapter was **trained without differential privacy**: it carries no formal privacy guarantee "
            "for the clients' data."
        )
    clients, epsilon = report.clients, report.epsilon
    rates = [c["sample_rate"] for c in clients] or _as_list(report.extra.get("sample_rate"))  # version 0: one q
    steps = [c["steps"] for c in clients]
    rows = [
        ("epsilon (worst-case client)", _num(epsilon)),
        ("delta", _num(report.delta)),
        ("noise multiplier sigma", _num(report.noise_multiplier)),
        ("per-sample clip norm C (`per_sample_max_grad_norm`)", _num(report.per_sample_max_grad_norm)),
        (
            "sample rate q (min / max over clients)",
            f"{_num(min(rates))} / {_num(max(rates))}" if rates else "not reported",
        ),
        ("DP-SGD steps (max over clients)", str(max(steps)) if steps else "not reported"),
        ("accountant", f"`{report.accountant}`"),
        ("privacy unit", report.unit),
    ]
    users = [c["users"] for c in clients if c.get("users") is not None]  # user-level DP only
    if users:
        rows.append(("users per client (min / max)", f"{min(users)} / {max(users)}"))
    if report.target_epsilon is not None:
        rows.insert(1, ("target epsilon", _num(report.target_epsilon)))
    if report.worst_case_epsilon is not None:
        rows.insert(1, ("epsilon bound for a client in every round", _num(report.worst_case_epsilon)))
    if report.sigma_calibration:
        rows.append(("sigma calibrated for", CALIBRATED_FOR.get(report.sigma_calibration, report.sigma_calibration)))
    if report.clip_groups:
        groups = ", ".join(f"{g}: {_num(float(c))}" for g, c in report.clip_groups.items())
        rows.append(("clipping groups (per-example clip norm of each)", groups))
        rows.append(("joint per-example sensitivity (noise std / sigma)", _num(float(report.sensitivity))))
    text = _privacy_lead(report, epsilon) + _earlier_spending(report.earlier_spending)
    text += ["", "| quantity | value |", "|---|---|"]
    text += [f"| {name} | {value} |" for name, value in rows]
    if clients:
        text += ["", "Per client:", "", "| client | epsilon | sample rate | steps |", "|---|---|---|---|"]
        text += [
            f"| {c['client']} | {_num(c['epsilon'])} | {_num(c['sample_rate'])} | {c['steps']} |" for c in clients
        ]
    return "\n".join(text)


def _privacy_lead(report: PrivacyReport, epsilon) -> list[str]:
    guarantee = f"(epsilon = {_num(epsilon)}, delta = {_num(report.delta)})-differential privacy"
    unit = (
        f"The privacy unit is **{report.unit}**; each client has its own accountant and "
        "the epsilon is the largest over clients."
    )
    if report.privacy_unit == "user":
        unit += (
            f" Users (column `{report.user_column}`), not examples, were Poisson-sampled, one example of "
            "each sampled user per step, so the guarantee covers all of a user's examples at a client together "
            "(under example-level DP a user with m examples would be protected only as m examples are)."
        )
    status = privacy_status(report)
    if status == "no_noise":
        return [
            "This adapter was trained with DP-SGD's per-sample clipping but **without noise** (noise multiplier "
            "0, epsilon = inf): it carries **no formal privacy guarantee** for the clients' data."
        ]
    if status == "fixed_seed":
        detail = report.noise_seed_warning
        return [
            "> **Warning: no privacy guarantee.** The DP noise and Poisson sampling of this run came from a fixed "
            "`noise_seed` (a setting for tests and research), not from secret randomness: anyone who knows the "
            "seed can re-create the noise and remove it, so the guarantee computed below does **not** hold."
            + (f"\n> {detail}" if detail else ""),
            "",
            f"Had the randomness been secret, the accountant's numbers would give {guarantee}. {unit}",
        ]
    return [
        f"Trained with **{guarantee}** (DP-SGD with per-sample clipping, Gaussian noise and Poisson sampling on "
        f"every client). {unit}"
    ]


def _earlier_spending(earlier) -> list[str]:
    """A sentence on the privacy spent by the run this adapter was trained from (`privacy.prior`), if any."""
    if not isinstance(earlier, dict):
        return []
    source = f"`{earlier.get('source')}`"
    if earlier.get("included"):
        how = {"per_client": "per client", "worst_case": "as the worst case over its clients, for every client"}
        return [
            "",
            f"This epsilon **includes** the earlier run this adapter was trained from ({source}, epsilon = "
            f"{_num(earlier.get('epsilon'))} alone), declared to use the same data: both runs' DP-SGD steps are "
            f"composed {how.get(earlier.get('composition'), '')} by the accountant.",
        ]
    if not earlier.get("checked", True):
        text = f"The earlier privacy spending of the Hub adapter this run started from ({source}) was not checked"
    elif earlier.get("dp") is False:
        text = f"The adapter this run started from ({source}) was trained **without** differential privacy"
    else:
        text = (
            f"The earlier spending of **epsilon = {_num(earlier.get('epsilon'))}** (delta = "
            f"{_num(earlier.get('delta'))}) by the run this adapter was trained from ({source})"
        )
    return [
        "",
        f"> **{text}, and it is NOT included in the epsilon below.** If that run used the same data, the total "
        "privacy loss of that data is larger than stated here.",
    ]


def _metric_kind(name: str) -> str:
    return name.split("_", 1)[1] if name.startswith(("eval_", "test_")) else name


def _metrics_section(metrics: dict, dataset: str | None, eval_round, adapter_round, num_rounds) -> str:
    if not metrics:
        return "No evaluation results were reported."
    head = f"On `{dataset}`" if dataset else "On the held-out evaluation data"
    if eval_round is not None:
        head += f", after round {eval_round} of {num_rounds}"
    head += ":"
    if eval_round is not None and eval_round != adapter_round:
        head += (
            f"\n\n**These results are of the global adapter after round {eval_round}, not of the final adapter "
            f"in this repo (after round {adapter_round}), which was not evaluated.** They are not listed as "
            "model-index results."
        )
    return "\n".join(
        [head, "", "| metric | value |", "|---|---|"] + [f"| {k} | {_num(v)} |" for k, v in metrics.items()]
    )


def _front_matter(
    base_model: str | None, metrics: dict, dataset: str | None, task: str | None, name: str, *, private: bool
) -> str:
    results = [
        EvalResult(
            task_type=task or "other",
            dataset_type=dataset or "unspecified",
            dataset_name=dataset or "unspecified",
            metric_type=_metric_kind(k),
            metric_value=v,
            metric_name=k,
        )
        for k, v in metrics.items()
    ]
    data = ModelCardData(
        library_name="peft",
        base_model=base_model or None,
        tags=[t for t in TAGS if private or t != DP_TAG],
        datasets=[dataset] if dataset else None,
        pipeline_tag=task or None,
        model_name=name if results else None,
        eval_results=results or None,
    )
    return data.to_yaml() + "\n"


def _check_metrics(metrics) -> dict:
    if not isinstance(metrics, dict):
        raise ConfigError(f"`metrics` must be a dict of name -> number, got {type(metrics).__name__}.")
    for key, value in metrics.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(
                f"`metrics` must map names to numbers, got {key!r}: {value!r}. Pass plain floats, "
                "e.g. {'accuracy': 0.91}."
            )
    return {k: int(v) if isinstance(v, numbers.Integral) else float(v) for k, v in metrics.items()}


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _num(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        text = f"{value:.4g}"
        return text if any(c in text for c in ".e") else text + ".0"
    return str(value)
