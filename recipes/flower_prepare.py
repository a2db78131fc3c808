"""
Prepare the Flower recipe's clients (`recipes/flower_app`): the offline default job's data, one folder per client.

It writes exactly the clients of `fed_roberta.py`'s embedded default (Rotten Tomatoes snippets, whole movies per
client, tokenised for all-MiniLM-L6-v2), the held-out test split, and the mean-pooling statistics of the model (from
unlabeled held-out inputs: public, no privacy cost):

    python recipes/flower_prepare.py --output_dir /srv/lalora_rt          # client_0 ... client_9, test, pooling
    python recipes/flower_prepare.py --output_dir /srv/lalora_rt --num_clients 2 --clients_per_round 2

Copy `client_<k>` (and `pooling.safetensors`) to the machine of SuperNode k, then start it with
`--node-config 'partition-id=<k> data-path="/srv/lalora_rt/client_<k>" state-dir="/srv/lalora_state"'`.
Takes the same flags as `fed_roberta.py` (`--num_clients`, `--seed`, `--max_seq_length`, ...). With
`--privacy_unit user --user_column pseudo_user` the clients keep the derived pseudo-critic column (see
`data.add_pseudo_users`: no real person) for a user-level run, `flwr run ... -c 'privacy-unit="user"
user-column="pseudo_user"'`; a node can require it with `--node-config '... min-privacy-unit="user"
user-column="pseudo_user"'`.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling recipes
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fed_roberta  # noqa: E402
from transformers import DataCollatorWithPadding  # noqa: E402

from peft_lalora.federated import partition_dataset  # noqa: E402
from peft_lalora.pooling import save_pooling, standardise  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, args = fed_roberta.parse_args(argv)
    split = fed_roberta.resolve_client_split(data_args, args)
    model, tokenizer = fed_roberta.load_model(model_args, 2, "cpu")
    train, clients, test, _ = fed_roberta.load_splits(data_args, args, tokenizer, split)
    if clients is None:  # an IID or Dirichlet split of one dataset: partition it as the trainer would
        clients = partition_dataset(
            train,
            args.num_clients,
            dirichlet_alpha=args.dirichlet_alpha,
            seed=args.seed,
            min_shard_size=args.min_shard_size or args.per_device_train_batch_size,
        )
    out = args.output_dir
    for k, dataset in enumerate(clients):
        dataset.save_to_disk(os.path.join(out, f"client_{k}"))
    test.save_to_disk(os.path.join(out, "test"))
    if fed_roberta.resolve_pooling(model_args) == "mean":
        standardise(model.get_base_model(), test, DataCollatorWithPadding(tokenizer))
        save_pooling(model.get_base_model(), out)
    summary = {
        "output_dir": os.path.abspath(out),
        "clients": [len(c) for c in clients],
        "test": len(test),
        "client_split": split,
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
