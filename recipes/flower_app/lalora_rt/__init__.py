"""The offline default job as a Flower app (`apps.py`, `client.py`, `task.py`)."""
