"""The names of the records a Flower train message and its reply carry (see `peft_lalora.flower.protocol`)."""

GLOBAL, CONFIG, DELTA, METRICS, PRIVACY, NODE = "global", "config", "delta", "metrics", "privacy", "node"
