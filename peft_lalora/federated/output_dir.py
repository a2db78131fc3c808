"""One run per `output_dir`: a fresh run refuses a folder that holds another run's artifacts, or (when allowed to
overwrite) removes them before it writes anything, so that a folder never mixes an adapter, card, privacy report
or checkpoint of two runs.
"""

from __future__ import annotations

import logging
import os
import shutil

from ..errors import ConfigError
from .checkpoint import STATE_DIR

logger = logging.getLogger(__name__)

# What a run writes to its folder: the round checkpoint, the adapter (`save_model`) with its card, privacy report
# and training arguments, and the processor files `save_model` copies next to them.
RUN_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "privacy_report.json",
    "training_args.json",
    "pooling.safetensors",
)
CARD_FILE = "README.md"
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)


def run_artifacts(output_dir: str) -> list[str]:
    """The names in `output_dir` that belong to a run (its checkpoint, its adapter folder); [] for a fresh folder."""
    if not os.path.isdir(output_dir):
        return []
    found = [STATE_DIR] if os.path.isdir(os.path.join(output_dir, STATE_DIR)) else []
    found += [name for name in RUN_FILES if os.path.isfile(os.path.join(output_dir, name))]
    found += sorted(
        name
        for name in os.listdir(output_dir)  # peft's layout for an adapter not named "default"
        if name != STATE_DIR and os.path.isfile(os.path.join(output_dir, name, "adapter_config.json"))
    )
    return found


def prepare_output_dir(args, *, resuming: bool) -> None:
    """
    Called by `FederatedDPTrainer.train()` before anything is written. A run that is not resuming refuses an
    `output_dir` holding another run (`ConfigError`), unless `args.overwrite_output_dir` is True: then the old
    run's artifacts are removed first (by the processes that save). Files that are not a run's are left alone.
    """
    if resuming:
        return
    output_dir = args.output_dir
    found = run_artifacts(output_dir)
    if not found:
        return
    if not getattr(args, "overwrite_output_dir", False):
        raise ConfigError(
            f"`output_dir` {output_dir!r} holds another run ({', '.join(found)}): a new run there would overwrite "
            "its checkpoint and leave its adapter, model card and privacy report mixed with this run's. Use a "
            "fresh `output_dir`, continue that run (`train(resume_from_checkpoint=True)`; in the recipes and "
            "scripts: `--resume_from_checkpoint True`), or delete it first (`overwrite_output_dir=True`; "
            "`--overwrite_output_dir True`)."
        )
    if not args.should_save:
        return
    logger.warning("overwrite_output_dir=True: removing the earlier run in %s (%s)", output_dir, ", ".join(found))
    for name in (CARD_FILE, *RUN_FILES, *PROCESSOR_FILES, *found):  # the card first: never one without its run
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path):
            os.remove(path)
