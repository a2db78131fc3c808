"""Mean pooling for sentence-transformer checkpoints: see `flower_app/lalora_rt/pooling.py` (it lives in the Flower
app's package, which ships only its own folder to the SuperNodes; every recipe uses that one copy)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "flower_app"))

from lalora_rt.pooling import MeanPooler, save_pooling, standardise, use_mean_pooling  # noqa: E402

__all__ = ["MeanPooler", "save_pooling", "standardise", "use_mean_pooling"]
