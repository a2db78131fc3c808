"""The offline default job as a Flower app (`apps.py`, `task.py`)."""
