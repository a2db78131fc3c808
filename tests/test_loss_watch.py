"""`LossWatch`: a warning when a logged loss explodes, from what the logs already disclose and nothing else."""

import math
import warnings
from types import SimpleNamespace

import pytest

from peft_lalora import LALoraWarning
from peft_lalora.federated.divergence import LossWatch


def _log(watch, logs, dp=False, step=3):
    args, state = SimpleNamespace(dp=dp, learning_rate=1.0), SimpleNamespace(global_step=step)
    watch.on_log(args, state, None, logs=logs)


def test_a_loss_past_five_times_the_uniform_guess_warns_once_with_its_value():
    watch = LossWatch(reference_loss=math.log(2))
    with pytest.warns(LALoraWarning, match=r"training loss of round 3 is 84, over 5x .*\(0.6931\).*tuned non-private"):
        _log(watch, {"loss": 84.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", LALoraWarning)
        _log(watch, {"loss": 90.0}, step=4)  # once per loss
        _log(watch, {"eval_loss": 0.6})  # a healthy evaluation loss


def test_without_a_reference_the_first_value_is_the_reference_and_nan_warns():
    watch = LossWatch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LALoraWarning)
        _log(watch, {"eval_loss": "2.0"}, dp=True)  # a formatted value is read as a number
        _log(watch, {"eval_loss": 9.9}, dp=True)
    with pytest.warns(LALoraWarning, match=r"evaluation loss after round 3 is not finite") as record:
        _log(watch, {"eval_loss": float("nan")}, dp=True)
    assert "non-private" not in str(record[0].message)  # the DP run's rate is not called too large for no DP


def test_a_dp_run_that_does_not_log_its_training_loss_gets_no_training_loss_warning():
    # under DP the round's loss is logged only with log_private_metrics=True; the watch reads the logs alone
    watch = LossWatch(reference_loss=math.log(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _log(watch, {"round": 1.0, "learning_rate": 1.0, "clients": 4.0, "epsilon": 3.0}, dp=True)
    assert not [w for w in caught if issubclass(w.category, LALoraWarning)] and watch.warned == set()
    # ... while the same watch does warn once the loss is in the logs (it was watching)
    with pytest.warns(LALoraWarning, match="training loss of round 3"):
        _log(watch, {"loss": 84.0}, dp=True)


def test_a_bad_reference_is_refused_by_name():
    with pytest.raises(ValueError, match="`reference_loss` must be a finite number > 0, got 0.0"):
        LossWatch(reference_loss=0.0)
