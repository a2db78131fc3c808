"""The offline default job as a Flower app (`apps.py`); `pooling.py` is shared with the other recipes."""
