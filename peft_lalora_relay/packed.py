"""The adapter on Flower's wire: one `Array` of safetensors bytes per record instead of one `Array` per tensor.

Flower 1.42 moves a message as a tree of objects, each pushed and pulled with its own request at every hop
(ServerApp -> SuperLink -> SuperNode -> ClientApp, and back), and an `ArrayRecord` holds one `Array` per tensor, at
least two objects each. So a round's cost grew with the adapter's tensor count, not its bytes: on loopback (quiet
2-core machine, `benchmarks/flower_round_overhead.py`), a reply's way from the relay to the ServerApp took 1.0-1.3 s
for the MiniLM adapter's 25 tensors and 3.1-6.7 s for the 24-layer encoder's 97. Packed, a record is one `Array`
(one object per 5 MB chunk, Flower's `FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`) whatever the tensor count. The bytes are
safetensors, which the private trainer's channel already speaks and which runs no code when read.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord

NAME = STYPE = "safetensors"


def pack(payload: bytes) -> ArrayRecord:
    """A record of one `Array` holding `payload` (safetensors bytes of the tensors)."""
    return ArrayRecord({NAME: Array(dtype="uint8", shape=(len(payload),), stype=STYPE, data=bytes(payload))})


def unpack(record: ArrayRecord) -> bytes:
    """The safetensors bytes of a packed record; ValueError for any other record (e.g. one `Array` per tensor)."""
    if list(record.keys()) != [NAME] or record[NAME].stype != STYPE:
        found = {name: array.stype for name, array in record.items()}
        raise ValueError(
            f"expected a packed adapter (one Array {NAME!r} of stype {STYPE!r}: peft_lalora_relay.packed), got "
            f"{len(found)} Array(s) {dict(list(found.items())[:4])}{' ...' if len(found) > 4 else ''}"
        )
    return record[NAME].data
