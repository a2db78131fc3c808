"""A warning when a run's loss explodes: a learning rate too large for the mode (non-private steps are neither
clipped nor noised, so DP's rates diverge there) otherwise ends as a model at the majority class and no word.

`LossWatch` is a transformers `TrainerCallback`: it reads only what the trainer has already logged, so it discloses
nothing beyond the logs. Under DP the round's training loss is logged only with `log_private_metrics=True`
(`federated.disclosure`); without it the watch sees the evaluation loss alone (held-out data, not the clients').
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

from transformers import TrainerCallback

from ..errors import ConfigError, LALoraWarning

WATCHED = {"loss": "training loss of round", "eval_loss": "evaluation loss after round"}
DEFAULT_FACTOR = 5.0


class LossWatch(TrainerCallback):
    """
    Warns (`LALoraWarning`, once per watched loss) when a logged `loss` or `eval_loss` is not finite or exceeds
    `factor` x the reference: `reference_loss` when given (e.g. ln(num_labels), the cross-entropy of a uniform
    guess), else the first value logged for that loss.
    """

    def __init__(self, reference_loss: Optional[float] = None, factor: float = DEFAULT_FACTOR):
        if reference_loss is not None and not (math.isfinite(reference_loss) and reference_loss > 0):
            raise ConfigError(f"`reference_loss` must be a finite number > 0, got {reference_loss!r}.")
        self.reference_loss = reference_loss
        self.factor = factor
        self.first: dict[str, float] = {}
        self.warned: set[str] = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, what in WATCHED.items():
            value = _number((logs or {}).get(key))
            if value is None or key in self.warned:
                continue
            reference = self.reference_loss if self.reference_loss is not None else self.first.setdefault(key, value)
            if math.isfinite(value) and value <= self.factor * reference:
                continue
            self.warned.add(key)
            warnings.warn(_message(what, value, reference, self, args, state), LALoraWarning, stacklevel=2)


def _message(what: str, value: float, reference: float, watch: LossWatch, args, state) -> str:
    base = "the cross-entropy of a uniform guess" if watch.reference_loss is not None else "its first value"
    size = "is not finite" if not math.isfinite(value) else f"is {value:.4g}, over {watch.factor:g}x {base}"
    lr = getattr(args, "learning_rate", None)
    advice = f"Lower `learning_rate` (now {lr:g})" if lr is not None else "Lower the learning rate"
    if not getattr(args, "dp", True):
        advice += (
            ": without DP the steps are neither clipped nor noised and need a smaller rate than DP's (the "
            "privacy-utility benchmark tuned non-private LoRA to 0.1)"
        )
    return (
        f"The {what} {state.global_step} {size} ({reference:.4g}): training diverges and the model is likely no "
        f"better than the majority class. {advice}."
    )


def _number(value) -> Optional[float]:
    """A logged value as a float (a progress callback may have formatted it as text); None if it is not one."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
