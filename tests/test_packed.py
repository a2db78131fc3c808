"""Tensors on Flower's wire are packed: one `Array` of safetensors bytes per record, whatever the tensor count
(`peft_lalora_relay.packed`: Flower moves every object of a message with its own request at each hop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from safetensors.numpy import load as load_arrays

from peft_lalora.flower import protocol
from peft_lalora_relay.packed import pack, unpack


def adapter(layers: int) -> dict:
    # an adapter's tensors: A and B of query and value in every layer, and a head
    gen = torch.Generator().manual_seed(layers)
    state = {
        f"layer.{i}.{m}.lora_{f}.weight": torch.randn(8, 16, generator=gen)
        for i in range(layers)
        for m in ("query", "value")
        for f in "AB"
    }
    return {**state, "classifier.weight": torch.randn(2, 16, generator=gen, dtype=torch.float64)}


def test_a_packed_record_is_one_array_whatever_the_tensor_count_and_reads_back_float32():
    # Prepare: a 6-layer and a 24-layer adapter (25 and 97 tensors; the head in float64)
    for layers in (6, 24):
        state = adapter(layers)
        # Execute
        record = protocol.pack_state(state)
        back = protocol.state_of(record)
        # Assert: one Array, the same number of Flower objects for both sizes, the tensors as sent, in float32
        assert list(record.keys()) == ["safetensors"]
        assert len(get_all_nested_objects(record)) == 3  # the record, its Array, one chunk (< 5 MB)
        assert len(get_all_nested_objects(ArrayRecord(state))) >= 2 * len(state)  # one Array per tensor: the cost
        assert sorted(back) == sorted(state) and all(t.dtype == torch.float32 for t in back.values())
        for name, tensor in state.items():
            torch.testing.assert_close(back[name], tensor.float(), atol=0, rtol=0)


def test_the_relay_forwards_the_bytes_it_was_sent():
    # Prepare: safetensors bytes as the private trainer's channel carries them
    state = protocol.pack_state(adapter(2))
    payload = unpack(state)
    # Execute / Assert: pack(unpack(.)) is the identity on the bytes, which numpy's safetensors reads alike
    assert unpack(pack(payload)) == payload
    assert sorted(load_arrays(payload)) == sorted(adapter(2))
    assert unpack(pack(b"")) == b""


@pytest.mark.parametrize(
    "record",
    [
        ArrayRecord({"a": Array(np.ones(3, dtype=np.float32))}),  # the former layout: one Array per tensor
        ArrayRecord({"safetensors": Array(np.ones(3, dtype=np.float32))}),  # the right name, not packed bytes
        ArrayRecord(),
    ],
)
def test_a_record_that_is_not_packed_is_refused_naming_the_layout(record):
    with pytest.raises(ValueError, match="expected a packed adapter"):
        protocol.state_of(record)


def test_packed_bytes_that_are_not_safetensors_are_refused():
    with pytest.raises(ValueError, match="not safetensors"):
        protocol.state_of(pack(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "))
