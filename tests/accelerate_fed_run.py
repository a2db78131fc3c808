"""Run by tests/test_accelerate.py under `accelerate launch`: a small federated run, adapter saved to argv[1]."""

import hashlib
import json
import os
import sys

from fed_helpers import toy_args, toy_dataset, toy_model

from peft_lalora import FederatedDPTrainer

if __name__ == "__main__":
    output_dir = sys.argv[1]
    secret = sys.argv[2:] == ["secret"]  # the noise from the OS's entropy instead of the fixed test seed
    args = toy_args(
        output_dir,
        num_clients=6,
        clients_per_round=4,
        num_rounds=2,
        local_steps=2,
        use_cpu=True,
        **({"noise_seed": None} if secret else {}),
    )  # use_cpu: MULTI_CPU (gloo) under torchrun
    trainer = FederatedDPTrainer(model=toy_model("lalora"), args=args, train_dataset=toy_dataset(240))
    trainer.train()
    trainer.save_model(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"clients-{trainer.args.process_index}.json"), "w") as handle:
        # which noise root this rank used (private: the secret has no public accessor, by design)
        root = hashlib.sha256(str(trainer._private_seed).encode()).hexdigest()
        json.dump(
            {"world_size": trainer.args.world_size, "clients": trainer.local_clients, "noise_root": root}, handle
        )
    trainer.accelerator.end_training()  # destroy the gloo process group before exit (else a rank can abort)
