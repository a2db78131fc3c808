"""What the recipes share: the method and LoRA flags, the federated defaults, their argument parser, and what they
do after building their trainer (train, evaluate, save, push, print the result)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import typing
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments

from peft_lalora import FederatedDPArguments
from peft_lalora.federated.checkpoint import STATE_DIR
from peft_lalora.federated.divergence import LossWatch
from peft_lalora.tuner import METHODS

# Federated defaults every recipe's embedded job starts from (each adds its own rounds, steps and folder). A round
# checkpoint after every round (`federated_state/`, a LoRA round's state is small) lets `--resume_from_checkpoint`
# finish a killed run.
RECIPE_DEFAULTS = dict(
    num_clients=10,
    clients_per_round=4,
    per_device_train_batch_size=32,
    learning_rate=1.0,  # tuned for DP's clipped, noised steps
    local_optimizer="sgd",
    per_sample_max_grad_norm=1.0,
    seed=42,
    report_to="none",
    save_strategy="steps",
)
# Without DP (`--dp False`) the steps are neither clipped nor noised and 1.0 diverges (the default job: loss 84,
# accuracy at the majority class). The privacy-utility benchmark tuned non-private LoRA over [0.1, 0.3, 1.0, 3.0] and
# picked 0.1 (benchmarks/results/privacy_utility.md: 70.83 % at 0.1; privacy_utility_vision.md: 0.1 too).
NONPRIVATE_LEARNING_RATE = 0.1


@dataclass
class LoraArguments:
    """The method and the adapter's LoRA settings: the first fields of every recipe's ModelArguments."""

    method: str = field(default="lalora", metadata={"help": ", ".join(METHODS)})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scale numerator (scale = lora_alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})


class RecipeArgumentParser(HfArgumentParser):
    """
    `HfArgumentParser` whose `--help` lists the recipe's own flags first, then the federated / DP flags (the
    fields `FederatedDPArguments` adds or redefines, such as `per_device_train_batch_size`), then the
    generic `TrainingArguments` flags. Parsing is unchanged.
    """

    def _add_dataclass_arguments(self, dtype):
        if not (isinstance(dtype, type) and issubclass(dtype, TrainingArguments)):
            return super()._add_dataclass_arguments(dtype)
        generic = TrainingArguments.__dataclass_fields__
        groups = {
            False: self.add_argument_group(f"federated and differential-privacy arguments ({dtype.__name__})"),
            True: self.add_argument_group("generic transformers TrainingArguments"),
        }
        hints = typing.get_type_hints(dtype)
        for fld in sorted(dataclasses.fields(dtype), key=lambda f: generic.get(f.name) is f):
            if fld.init:
                fld.type = hints[fld.name]
                self._parse_dataclass_field(groups[generic.get(fld.name) is fld], fld)


def recipe_parser(*recipe_dataclasses, defaults: dict) -> RecipeArgumentParser:
    """The parser of a recipe: its own dataclasses, then `FederatedDPArguments`, with the recipe's defaults."""
    parser = RecipeArgumentParser(
        (*recipe_dataclasses, FederatedDPArguments),
        usage="%(prog)s [--flag value ...]  (recipe flags, then federated / DP flags, then "
        "the generic TrainingArguments flags, below)",
    )
    parser.set_defaults(**defaults)
    return parser


def parse_recipe_args(parser: HfArgumentParser, argv: list[str] | None, default_target_epsilon: float) -> tuple:
    argv = sys.argv[1:] if argv is None else argv
    if not any(a.split("=")[0] in ("--noise_multiplier", "--target_epsilon") for a in argv) and not _dp_off(argv):
        parser.set_defaults(target_epsilon=default_target_epsilon)  # DP needs exactly one of the two
    if _dp_off(argv) and not any(a.split("=")[0] == "--learning_rate" for a in argv):
        parser.set_defaults(learning_rate=NONPRIVATE_LEARNING_RATE)
    return parser.parse_args_into_dataclasses(args=argv)


def _dp_off(argv: list[str]) -> bool:
    """Whether the command line turns DP off (`--dp False`, `--dp=false`, `--no_dp`): no default epsilon then."""
    for i, arg in enumerate(argv):
        if arg == "--no_dp":
            return True
        name, _, value = arg.partition("=")
        if name == "--dp":
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            return value.lower() in ("false", "0", "no", "n", "f")
    return False


def resume_argument(args):
    """`--resume_from_checkpoint` as `FederatedDPTrainer.train()` takes it: None for a fresh run, True ("true")
    for the run in `output_dir`, else the `federated_state` folder named (or the one inside the run folder named)."""
    value = args.resume_from_checkpoint
    if value is None or value is False or str(value).lower() in ("false", "no", "0", ""):
        return None
    if value is True or str(value).lower() in ("true", "yes", "1"):
        return True
    nested = os.path.join(str(value), STATE_DIR)
    return nested if os.path.isdir(nested) else str(value)


def busy_machine_hint() -> None:
    """Log a hint when the cores are shared and torch still uses several threads: under load, threads wait for
    each other (two rounds of the default job took 1034 s with torch's 2 threads against 509 s with
    OMP_NUM_THREADS=1 at load average 10-20 on 2 cores; README.md)."""
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if threads > 1 and "OMP_NUM_THREADS" not in os.environ and load > cores:
        logging.getLogger("recipes").warning(
            "The machine is busy (load average %.1f on %d cores) and torch uses %d threads: set "
            "OMP_NUM_THREADS=1, which ran the default job's rounds 2x faster under such load (README.md).",
            load,
            cores,
            threads,
        )


def final_metrics(trainer, key: str = "eval_accuracy") -> dict:
    """The evaluation of the final global adapter: the one logged after the last round, else a fresh one."""
    logged = [log for log in trainer.state.log_history if key in log]
    if logged and logged[-1].get("step") == trainer.args.num_rounds:
        return logged[-1]
    return trainer.evaluate()


def train_and_report(
    trainer,
    args,
    start: float,
    after_save=None,
    metric: str = "accuracy",
    extra_metrics=None,
    reference_loss=None,
    before_save=None,
    **extra,
) -> dict:
    """Train (resuming if `--resume_from_checkpoint`; warning if a logged loss explodes past 5x `reference_loss`,
    else past 5x its first value), save the adapter folder (`before_save(output_dir)` first, e.g. a base model the
    adapter names; then adapter, card and privacy report; then `after_save(output_dir)` adds the recipe's own
    files), push if asked, print and return the result. `metric` is the evaluation metric printed
    (`eval_<metric>`); `extra_metrics()` returns more results measured after training (e.g. by generation)."""
    busy_machine_hint()
    trainer.add_callback(LossWatch(reference_loss))
    trainer.train(resume_from_checkpoint=resume_argument(args))
    metrics = final_metrics(trainer, f"eval_{metric}")
    more = extra_metrics() if extra_metrics is not None else {}
    if before_save is not None and trainer.is_world_process_zero():
        before_save(args.output_dir)
    trainer.save_model(args.output_dir)
    if after_save is not None and trainer.is_world_process_zero():
        after_save(args.output_dir)
    report = trainer.privacy_report()
    if args.push_to_hub:
        trainer.push_to_hub()
    result = {
        f"eval_{metric}": metrics.get(f"eval_{metric}"),
        **more,
        "epsilon": report["epsilon"],
        "delta": report.get("delta"),
        "noise_multiplier": report.get("noise_multiplier"),
        "output_dir": os.path.abspath(args.output_dir),
        "wall_time_s": round(time.time() - start, 1),
        **extra,
    }
    if trainer.is_world_process_zero():
        print(json.dumps(result, indent=1))
        for name in (f"eval_{metric}", *more):
            value = result[name]
            print(f"{name.removeprefix('eval_')}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
        print(f"epsilon: {result['epsilon']:.4f} (delta {result['delta']}, sample-level, per client)")
        print(f"output_dir: {result['output_dir']}")
    trainer.accelerator.end_training()  # several processes: destroy the process group before the interpreter exits
    return result
