"""Private fingerprints of the clients' data, so that a checkpoint is never resumed on other data.

A resumed round re-creates its noise from the root in the checkpoint (bit-identical resume). On the same data that
re-releases the same update; on edited data it would release a second update under the same noise, and their
difference would cancel the noise (measured: 0.0012 apart, against ~1.15 for independent noise). So the private
checkpoint records, per client, HMAC-SHA256 under a key derived from the private root of the tensors the client
trains on (its shard collated, in order; under user-level DP also each example's user id, which decides the
batches), and a resume whose data give another fingerprint is refused. Keyed, so the fingerprint says nothing
about the data to whoever reads it without the root (no dictionary attack on a plain hash); computed once per
run, from the same collation the training reads.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import torch

from ..errors import CheckpointMismatchError
from ..privacy.secure_random import derive_key

CHUNK = 1024


def shard_fingerprint(shard, root) -> str:
    """HMAC-SHA256 (key: `derive_key(root, "fingerprint")`) of the shard's examples as the model receives them:
    for every chunk of rows, each tensor's name, dtype, shape and bytes, in order."""
    mac = hmac.new(derive_key(root, "fingerprint"), digestmod=hashlib.sha256)
    mac.update(str(len(shard)).encode())
    for start in range(0, len(shard), CHUNK):
        batch = shard.batch(list(range(start, min(start + CHUNK, len(shard)))))
        for name in sorted(batch):
            tensor = batch[name].detach().to("cpu").contiguous()
            mac.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            mac.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    user_ids = getattr(shard, "user_ids", None)
    if user_ids is not None:  # user-level DP: who wrote each example decides the batches, so it is data too
        mac.update(b"users:" + json.dumps([repr(u) for u in user_ids]).encode())
    return mac.hexdigest()


def check_fingerprints(saved: list, current: list, directory: str) -> None:
    """Refuse a resume whose clients' data differ from the checkpoint's (a constant-time comparison per client)."""
    changed = [k for k, (a, b) in enumerate(zip(saved, current)) if not hmac.compare_digest(a, b)]
    if len(saved) != len(current) or changed:
        raise CheckpointMismatchError(
            f"The data of client(s) {changed or 'all'} differ from those the checkpoint {directory!r} was trained "
            "on. Resuming would re-create the checkpoint's noise on other data, and two releases under one noise "
            "cancel it in their difference. Resume with the same data, or start a fresh `output_dir`."
        )
