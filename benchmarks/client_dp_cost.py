"""Reduced-scale cost of client-level DP: the tests' tiny RoBERTa and toy task (label = first token > 50), 20
clients, 10 per round (q = 0.5), 8 rounds x 4 local steps, one seed; accuracy on 400 held-out toy examples.
Indicative only (one seed, a random tiny model): `python benchmarks/client_dp_cost.py` (about 10 CPU-minutes)."""

import json
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
warnings.filterwarnings("ignore")
from fed_helpers import accuracy, toy_args, toy_dataset, toy_model  # noqa: E402

from peft_lalora import FederatedDPTrainer  # noqa: E402

OUT = tempfile.mkdtemp(prefix="client_dp_cost_")
train, test = toy_dataset(n=1600, seed=0), toy_dataset(n=400, seed=1)
common = dict(
    num_clients=20,
    clients_per_round=10,
    num_rounds=8,
    local_steps=4,
    learning_rate=0.5,
    per_device_train_batch_size=8,
    eval_rounds=0,
)
arms = {
    "sample-level only (sigma=1)": {},
    "sample-level + client-level z=1.0 S=0.5": {
        "client_dp": True,
        "client_clip_norm": 0.5,
        "client_noise_multiplier": 1.0,
    },
    "client-level only z=1.0 S=0.5 (dp=False)": {
        "dp": False,
        "client_dp": True,
        "client_clip_norm": 0.5,
        "client_noise_multiplier": 1.0,
    },
    "non-private": {"dp": False},
}
out = {}
for name, extra in arms.items():
    accs = []
    for seed in (0,):
        t0 = time.time()
        tr = FederatedDPTrainer(
            model=toy_model(seed=seed),
            args=toy_args(os.path.join(OUT, f"{len(out)}_{seed}"), seed=seed, **common, **extra),
            train_dataset=train,
            eval_dataset=test,
            compute_metrics=accuracy,
        )
        tr.train()
        m = tr.evaluate()
        rep = tr.privacy_report()
        accs.append(m["eval_accuracy"])
    out[name] = {
        "accuracy": accs,
        "sample_eps": rep["epsilon"],
        "client_eps": rep.get("client_level", {}).get("epsilon"),
        "s": time.time() - t0,
    }
    print(name, json.dumps(out[name]), flush=True)
json.dump(out, open(os.path.join(OUT, "result.json"), "w"), indent=1)
