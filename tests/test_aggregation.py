"""Server aggregation: FedAvg against hand-computed means, factor-wise averaging, key rules, bad input."""

import numpy as np
import pytest
import torch

from peft_lalora import ConfigError
from peft_lalora.federated.aggregation import Aggregator, adapter_delta, apply_delta

A = "base.layer.lora_A.default.weight"
B = "base.layer.lora_B.default.weight"


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def weighted_mean(deltas, weights=None):
    """The aggregator's mean delta of `deltas` (the global state is zeros, so it is the mean itself)."""
    names = {n: t for delta in deltas for n, t in delta.items()}
    aggregator = Aggregator({n: torch.zeros_like(t) for n, t in names.items()})
    for delta, weight in zip(deltas, weights if weights is not None else [1.0] * len(deltas)):
        aggregator.add(delta, weight)
    return aggregator.mean()


def test_adapter_delta_is_local_minus_global():
    # Prepare
    global_ = {A: _t([[1.0, 2.0]]), B: _t([[0.5], [0.25]])}
    local = {A: _t([[1.5, 1.0]]), B: _t([[0.5], [1.25]])}
    # Execute
    delta = adapter_delta(local, global_)
    # Assert
    torch.testing.assert_close(delta[A], _t([[0.5, -1.0]]), rtol=0, atol=0)
    torch.testing.assert_close(delta[B], _t([[0.0], [1.0]]), rtol=0, atol=0)


def test_adapter_delta_only_over_sent_keys_and_rejects_unknown_keys():
    global_ = {A: _t([1.0]), B: _t([2.0])}
    assert list(adapter_delta({B: _t([3.0])}, global_)) == [B]
    with pytest.raises(ConfigError, match=r"`local` holds tensors the global adapter does not have: \['head'\]"):
        adapter_delta({"head": _t([1.0])}, global_)
    with pytest.raises(ConfigError, match=r"same shape.*got \(1,\) and \(2,\)"):
        adapter_delta({A: _t([1.0, 2.0])}, global_)


def test_uniform_mean_equals_hand_computed_mean():
    # Prepare
    deltas = [
        {A: _t([[1.0, 2.0]]), B: _t([[4.0], [0.0]])},
        {A: _t([[3.0, 6.0]]), B: _t([[-2.0], [1.0]])},
        {A: _t([[2.0, 1.0]]), B: _t([[1.0], [2.0]])},
    ]
    # Execute
    mean = weighted_mean(deltas)
    # Assert: A = ([1,2]+[3,6]+[2,1])/3 = [2, 3]; B = ([4,0]+[-2,1]+[1,2])/3 = [1, 1]
    torch.testing.assert_close(mean[A], _t([[2.0, 3.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean[B], _t([[1.0], [1.0]]), rtol=0, atol=1e-6)
    assert mean[A].dtype == torch.float32


def test_sample_weighted_mean_equals_hand_computed_mean():
    # Prepare: clients with 10 and 30 examples -> weights 1/4 and 3/4
    deltas = [{A: _t([4.0, 8.0])}, {A: _t([0.0, -4.0])}]
    # Execute
    mean = weighted_mean(deltas, weights=[10, 30])
    # Assert: 0.25 * [4, 8] + 0.75 * [0, -4] = [1, -1]
    torch.testing.assert_close(mean[A], _t([1.0, -1.0]), rtol=0, atol=0)
    # numpy counts are accepted too, and scaling the weights changes nothing
    torch.testing.assert_close(weighted_mean(deltas, weights=[np.int64(1), np.int64(3)])[A], mean[A], rtol=0, atol=0)


def test_factors_are_averaged_separately_not_their_product():
    # Prepare: two clients whose products B @ A differ
    deltas = [{A: _t([[1.0, 0.0]]), B: _t([[1.0]])}, {A: _t([[0.0, 1.0]]), B: _t([[3.0]])}]
    # Execute
    mean = weighted_mean(deltas)
    # Assert: mean(B) @ mean(A) = 2 * [0.5, 0.5] = [1, 1]; mean(B @ A) would be [0.5, 1.5]
    torch.testing.assert_close(mean[B] @ mean[A], _t([[1.0, 1.0]]), rtol=0, atol=0)


def test_mean_is_deterministic_and_keeps_dtype():
    gen = torch.Generator().manual_seed(0)
    deltas = [{A: torch.randn(8, 16, generator=gen, dtype=torch.bfloat16)} for _ in range(5)]
    first = weighted_mean(deltas, weights=[1.0, 2.0, 3.0, 4.0, 5.0])
    again = weighted_mean(deltas, weights=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert first[A].dtype == torch.bfloat16
    assert torch.equal(first[A], again[A])


def test_key_absent_from_all_clients_is_fine():
    # Prepare: FFA-LoRA, no client sends A
    deltas = [{B: _t([1.0]), "head": _t([2.0])}, {B: _t([3.0]), "head": _t([4.0])}]
    # Execute
    mean = weighted_mean(deltas)
    # Assert
    assert set(mean) == {B, "head"}
    torch.testing.assert_close(mean[B], _t([2.0]), rtol=0, atol=0)


def test_tensor_sent_by_some_clients_is_averaged_over_those_that_sent_it():
    # Factor-wise: client 1 sent no A, so A is the mean over clients 0 and 2; B over all three
    deltas = [{A: _t([1.0]), B: _t([1.0])}, {B: _t([4.0])}, {A: _t([3.0]), B: _t([1.0])}]
    mean = weighted_mean(deltas)
    torch.testing.assert_close(mean[A], _t([2.0]), rtol=0, atol=0)
    torch.testing.assert_close(mean[B], _t([2.0]), rtol=0, atol=0)


def test_merged_keeps_a_tensor_nobody_sent_bit_identical():
    global_ = {A: _t([0.1, 0.2]), B: _t([1.0])}
    aggregator = Aggregator(global_)
    aggregator.add({B: _t([0.5])}, 1.0)
    aggregator.add({B: _t([1.5])}, 3.0)
    new = aggregator.merged()
    assert new[A].numpy().tobytes() == global_[A].numpy().tobytes()
    torch.testing.assert_close(new[B], _t([2.25]), rtol=0, atol=0)  # 1 + (0.5 * 1 + 1.5 * 3) / 4


def test_delta_with_an_unknown_tensor_is_refused():
    with pytest.raises(ConfigError, match=r"`delta` holds tensors the global adapter does not have: \['x'\]"):
        Aggregator({A: _t([1.0])}).add({"x": _t([1.0])})


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1.0, 0.0], r"`weight` must be a finite number > 0.*got 0.0 for client 1"),
        ([-1.0, 2.0], r"got -1.0 for client 0"),
        ([1.0, float("inf")], r"got inf for client 1"),
        ([1.0, float("nan")], r"got nan for client 1"),
        ([True, 1.0], r"got True for client 0"),
    ],
)
def test_bad_weights_raise(weights, match):
    deltas = [{A: _t([1.0])}, {A: _t([2.0])}]
    with pytest.raises(ConfigError, match=match):
        weighted_mean(deltas, weights)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_raises_naming_it_and_the_client(bad):
    deltas = [{A: _t([1.0])}, {A: _t([1.0]), B: _t([bad])}]
    deltas[0][B] = _t([0.0])
    with pytest.raises(ConfigError, match=rf"`{B}` from client 1 holds non-finite values"):
        weighted_mean(deltas)


def test_empty_list_and_shape_mismatch_raise():
    with pytest.raises(ConfigError, match=r"at least one surviving client"):
        Aggregator({A: torch.zeros(2)}).mean()
    with pytest.raises(ConfigError, match=r"same shape in the global adapter and the delta, got \(2,\) and \(3,\)"):
        Aggregator({A: torch.zeros(2)}).add({A: torch.zeros(3)})


def test_apply_delta_adds_and_leaves_absent_keys_bit_identical():
    # Prepare: A holds values whose bits must survive untouched (a NaN payload would not survive arithmetic)
    a = torch.tensor([0.1, -0.0, 1e-38, 3.4e38], dtype=torch.float32)
    global_ = {A: a, B: _t([1.0, 2.0]), "head": _t([0.5], dtype=torch.float64)}
    delta = {B: _t([0.5, -1.0]), "head": _t([0.25])}
    # Execute
    new = apply_delta(global_, delta)
    # Assert
    assert new is not global_ and list(new) == [A, B, "head"]
    assert new[A].numpy().tobytes() == a.numpy().tobytes()
    assert new[A].data_ptr() != a.data_ptr()  # a copy: changing the result cannot change the old global
    torch.testing.assert_close(new[B], _t([1.5, 1.0]), rtol=0, atol=0)
    assert new["head"].dtype == torch.float64 and new["head"].item() == 0.75
    assert torch.equal(global_[B], _t([1.0, 2.0]))  # input untouched


def test_apply_delta_rejects_unknown_and_mis_shaped_keys():
    global_ = {A: _t([1.0])}
    with pytest.raises(ConfigError, match=r"`delta` holds tensors the global adapter does not have: \['x'\]"):
        apply_delta(global_, {"x": _t([1.0])})
    with pytest.raises(ConfigError, match=r"same shape in the global adapter and the delta"):
        apply_delta(global_, {A: _t([1.0, 2.0])})


def test_round_trip_delta_mean_apply_equals_mean_of_local_adapters():
    # Prepare: the new global must equal the plain mean of the clients' local adapters
    global_ = {A: _t([[1.0, 1.0]]), B: _t([[0.0]])}
    locals_ = [{A: _t([[2.0, 1.0]]), B: _t([[1.0]])}, {A: _t([[0.0, 3.0]]), B: _t([[3.0]])}]
    # Execute
    new = apply_delta(global_, weighted_mean([adapter_delta(loc, global_) for loc in locals_]))
    # Assert: A = ([2,1]+[0,3])/2 = [1, 2]; B = (1+3)/2 = 2
    torch.testing.assert_close(new[A], _t([[1.0, 2.0]]), rtol=0, atol=0)
    torch.testing.assert_close(new[B], _t([[2.0]]), rtol=0, atol=0)
