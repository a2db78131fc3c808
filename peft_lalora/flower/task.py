"""Moved to `peft_lalora.owner.task` (Flower-free: the private trainer builds the model and reads the data with the
same task object); `FlowerTask` is `TrainingTask`."""

from ..owner.task import TrainingTask

FlowerTask = TrainingTask

__all__ = ["FlowerTask", "TrainingTask"]
