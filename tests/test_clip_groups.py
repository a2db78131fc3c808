"""Issue 12 part 1: clipping groups {LoRA factors: C, head: C_h}, formally DP. The per-example sensitivity of the
released sum is sqrt(C^2 + C_h^2) and the noise is calibrated to it. References: hand-built per-example
gradients with known norms, and opacus' own per-layer clipping (`DPOptimizer` with a list of norms) where the
two coincide (one group per tensor)."""

import math

import pytest
import torch
from datasets import Dataset
from fed_helpers import adapter_state, make_trainer, toy_dataset
from opacus.optimizers import DPPerLayerOptimizer

from peft_lalora.privacy import GradientPrivatizer
from peft_lalora.privacy.secure_random import SecureRandom

A, HEAD = "layer.lora_A.default.weight", "classifier.modules_to_save.default.weight"
C, C_HEAD = 1.0, 0.25


def grouped(noise=0.0, generator=None):
    params = {A: torch.nn.Parameter(torch.zeros(3, 4)), HEAD: torch.nn.Parameter(torch.zeros(2, 4))}
    opt = GradientPrivatizer(
        torch.optim.SGD(params.values(), lr=1.0),
        noise_multiplier=noise,
        per_sample_max_grad_norm=C,
        factor_of={A: "A"},
        head_max_grad_norm=C_HEAD,
        generator=generator,
    )
    return opt, params


def test_one_example_cannot_move_a_group_by_more_than_its_threshold():
    # Prepare: 500 adversarial neighbour pairs: one example replaced by a huge or random gradient
    opt, params = grouped()
    g = torch.Generator().manual_seed(0)
    worst = {"lora": 0.0, "head": 0.0, "joint": 0.0}
    for _ in range(500):
        base = {A: torch.randn(8, 3, 4, generator=g), HEAD: torch.randn(8, 2, 4, generator=g)}
        other = {n: t.clone() for n, t in base.items()}
        scale = 10 ** float(torch.empty(1).uniform_(-2, 4, generator=g))
        other[A][3] = torch.randn(3, 4, generator=g) * scale
        other[HEAD][3] = torch.randn(2, 4, generator=g) * scale
        one = opt.privatize(base, params, expected_batch_size=1)
        two = opt.privatize(other, params, expected_batch_size=1)
        lora, head = float((one[A] - two[A]).norm()), float((one[HEAD] - two[HEAD]).norm())
        worst = {
            "lora": max(worst["lora"], lora),
            "head": max(worst["head"], head),
            "joint": max(worst["joint"], math.hypot(lora, head)),
        }
    # Assert: each group moves by at most twice its threshold (g_i out, g_i' in: the replace-one neighbour),
    # and the joint movement by at most 2 sqrt(C^2 + C_h^2)
    assert worst["lora"] <= 2 * C * (1 + 1e-6) and worst["head"] <= 2 * C_HEAD * (1 + 1e-6)
    assert worst["joint"] <= 2 * math.hypot(C, C_HEAD) * (1 + 1e-6)
    assert worst["head"] > 1.5 * C_HEAD  # the bound is reached, not trivially far


def test_adding_one_huge_example_moves_each_group_by_exactly_its_threshold():
    opt, params = grouped()
    empty = {A: torch.zeros(1, 3, 4), HEAD: torch.zeros(1, 2, 4)}
    huge = {A: torch.full((1, 3, 4), 1e3), HEAD: torch.full((1, 2, 4), 1e3)}
    moved = {n: opt.privatize(huge, params, 1)[n] - opt.privatize(empty, params, 1)[n] for n in params}
    assert float(moved[A].norm()) == pytest.approx(C, rel=1e-6)
    assert float(moved[HEAD].norm()) == pytest.approx(C_HEAD, rel=1e-6)


def test_noise_is_calibrated_to_the_joint_sensitivity():
    opt, params = grouped(noise=2.0, generator=SecureRandom(1, "noise"))
    big = {A: torch.nn.Parameter(torch.zeros(300, 300)), HEAD: torch.nn.Parameter(torch.zeros(200, 300))}
    zero = {n: torch.zeros(1, *p.shape) for n, p in big.items()}
    noisy = opt.privatize(zero, big, expected_batch_size=1)
    for name in big:
        assert float(noisy[name].std()) == pytest.approx(2.0 * math.hypot(C, C_HEAD), rel=0.01)
    assert opt.sensitivity([A]) == C  # a step where only the factor is active: its own threshold


def test_one_group_per_tensor_equals_opacus_per_layer_clipping():
    # With only the head absent, groups = {lora: C}: the same as opacus' flat clipping of that one tensor; with
    # one LoRA tensor and one head tensor, opacus' per-layer clipping with norms [C, C_h] is the same mechanism.
    torch.manual_seed(0)
    samples = {A: torch.randn(6, 3, 4) * 3, HEAD: torch.randn(6, 2, 4) * 3}
    opt, params = grouped()
    ours = opt.privatize(samples, params, expected_batch_size=6)
    ref_params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(2, 4))]
    for p, name in zip(ref_params, (A, HEAD)):
        p.grad_sample = samples[name].clone()
    ref = DPPerLayerOptimizer(
        torch.optim.SGD(ref_params, lr=1.0), noise_multiplier=0.0, max_grad_norm=[C, C_HEAD], expected_batch_size=6
    )
    ref.pre_step()
    torch.testing.assert_close(ours[A], ref_params[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[HEAD], ref_params[1].grad, rtol=1e-5, atol=1e-6)


def test_through_the_public_trainer_one_example_moves_the_update_by_at_most_the_bound(tmp_path):
    # Noise 0, one local step of plain SGD (lr 1) with every example in the batch (q = 1): the global update is
    # -sum of clipped gradients / B. Datasets differing in one example: the updates differ by <= 2 sqrt(C^2 + C_h^2) / B.
    def run(path, data):
        trainer = make_trainer(
            path,
            dataset=data,
            noise_multiplier=0.0,
            num_clients=1,
            clients_per_round=1,
            num_rounds=1,
            local_steps=1,
            per_device_train_batch_size=16,
            learning_rate=1.0,
            per_sample_max_grad_norm=C,
            per_sample_head_max_grad_norm=C_HEAD,
            method="dplora",
        )
        trainer.train()
        return adapter_state(trainer.model), trainer.privacy_report()

    data = toy_dataset(16)
    other = data.to_dict()
    other["labels"][1] = 1 - other["labels"][1]  # one example changed
    other["input_ids"][1] = [7] * len(other["input_ids"][1])

    one, report = run(tmp_path / "a", data)
    two, _ = run(tmp_path / "b", Dataset.from_dict(other))
    diff = math.sqrt(sum(float((one[n] - two[n]).pow(2).sum()) for n in one))
    assert 0 < diff <= 2 * math.hypot(C, C_HEAD) / 16 * (1 + 1e-5)
    assert report["clip_groups"] == {"lora": C, "head": C_HEAD}
    assert report["sensitivity"] == pytest.approx(math.hypot(C, C_HEAD))
