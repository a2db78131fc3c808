"""The privacy-utility benchmark's extra arms: the authors' mechanism (`benchmarks/pu_authors.py`, NOT DP) against
references written here, and the DP linear probe (only the head trains, LoRA stays the identity)."""

import os
import sys

import numpy as np
import pytest
import torch
from fed_helpers import adapter_state, make_trainer, toy_dataset, toy_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import _pu_report  # noqa: E402
import privacy_utility  # noqa: E402
import pu_authors  # noqa: E402


@pytest.mark.parametrize("dim", [0, 1])
def test_laplacian_smoothing_solves_the_periodic_system(dim):
    # Setup: (I - s L) x = g with L the periodic 1-D Laplacian, built as a dense matrix
    g = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d, s = g.shape[dim], 1.5
    eye = np.eye(d)
    laplacian = np.roll(eye, 1, axis=1) + np.roll(eye, -1, axis=1) - 2 * eye
    system = eye - s * laplacian
    # Execute
    out = pu_authors.laplacian_smoothing(g, dim=dim, strength=s)
    # Assert
    columns = g.numpy() if dim == 0 else g.numpy().T
    expected = np.linalg.solve(system, columns)
    np.testing.assert_allclose(out.numpy(), expected if dim == 0 else expected.T, atol=1e-6)  # float32 inside


def test_authors_step_clips_each_tensor_to_the_median_norm_and_adds_the_smoothing_step():
    # Setup: LA-LoRA, B and the head active, no noise, SGD at lr 0.1 (B at 2x, as in the authors' code)
    torch.manual_seed(0)
    model = toy_model("lalora")
    model.train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.base_model.set_trainable_factors({"B"})
    data = toy_dataset(16)
    batch = {
        "input_ids": torch.tensor(data["input_ids"]),
        "attention_mask": torch.tensor(data["attention_mask"]),
        "labels": torch.tensor(data["labels"]),
    }
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lrs = {n: 0.2 if "lora_B" in n else 0.1 for n in params}
    optimizer = torch.optim.SGD([{"params": [p], "lr": lrs[n]} for n, p in params.items()])
    model.eval()  # no dropout: the reference below sees the same forward pass
    loss = torch.nn.functional.cross_entropy(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    clip = min(float(torch.stack([g.norm() for g in grads.values()]).median()), pu_authors.MAX_CLIP)
    expected = {}
    for n, p in params.items():
        g = grads[n] * min(1.0, clip / float(grads[n].norm()))
        step = g + (pu_authors.laplacian_smoothing(g, dim=0) if "lora_B" in n else 0)
        expected[n] = p.detach() - lrs[n] * step
    step = pu_authors.AuthorsStep(model, sigma=0.0, extra_filter_step=True)
    step.reset(optimizer, torch.Generator().manual_seed(0))
    # Execute
    out = step(batch, expected_batch_size=16)
    # Assert: the data-dependent C, per-tensor clipping, the normal step plus the smoothed step on the factor only
    assert step.clip_norms == [pytest.approx(clip)] and clip <= pu_authors.MAX_CLIP
    assert out["batch_size"] == 16
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), expected[n], atol=1e-6, rtol=1e-5)


def test_authors_step_noise_has_std_sigma_c_over_batch():
    # Setup: an all-zero update but for the noise: lr 1, a batch whose gradients we discard by measuring p - p0 - g
    torch.manual_seed(0)
    model = toy_model("dplora")
    with torch.no_grad():  # B != 0, so that A's gradient (and the median tensor norm) is not zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.base_model.set_trainable_factors({"A", "B"})
    data = toy_dataset(8)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    step = pu_authors.AuthorsStep(model, sigma=3.0, extra_filter_step=False)
    step.reset(torch.optim.SGD(list(params.values()), lr=1.0), torch.Generator().manual_seed(1))
    model.eval()
    # Execute
    step(batch, expected_batch_size=8)
    # Assert: over the largest tensor, the update's spread matches sigma * C / batch (clipped signal <= C in norm)
    name = max(params, key=lambda n: params[n].numel())
    moved = (before[name] - params[name].detach()).flatten()
    expected_std = 3.0 * step.clip_norms[0] / 8
    assert moved.numel() >= 256 and expected_std > 0  # signal: at most C / 16 per coordinate, noise 3 C / 8
    assert float(moved.std()) == pytest.approx(expected_std, rel=0.2)


def test_linear_probe_trains_the_head_only_and_keeps_lora_at_identity(tmp_path):
    # Setup: the benchmark's DP linear probe arm on the toy federation
    model = privacy_utility.linear_probe(toy_model("dplora"))
    before = adapter_state(model)
    trainer = make_trainer(tmp_path, model=model)
    # Execute
    trainer.train()
    # Assert: every LoRA tensor is unchanged (B = 0: the frozen model), the head moved
    after = adapter_state(model)
    lora = [n for n in before if "lora_" in n]
    head = [n for n in before if "modules_to_save" in n]
    assert lora and head
    assert all(torch.equal(before[n], after[n]) for n in lora)
    assert all(float((before[n] - after[n]).abs().max()) > 0 for n in head)
    assert all(float(after[n].abs().max()) == 0 for n in lora if "lora_B" in n)


def test_user_level_arm_names_its_runs_and_pairs_them_with_the_example_level_ones():
    # Prepare: the arm's configurations, and two seeds' records of each unit at epsilon 3
    opts = privacy_utility.parse(["--units", "example", "user", "--methods", "lalora", "--epsilons", "3"])
    runs = [
        {
            "phase": "final",
            "method": method,
            "epsilon_target": 3.0,
            "seed": seed,
            "test_accuracy": acc,
            "noise_multiplier": sigma,
            "users_per_client": users,
        }
        for method, sigma, users, accs in (
            ("lalora", 0.8, None, (0.70, 0.68)),
            ("lalora@user", 1.1, [300, 330], (0.65, 0.64)),
        )
        for seed, acc in enumerate(accs)
    ]
    # Execute
    configs = privacy_utility.configurations(opts)
    lines = _pu_report.unit_lines(_pu_report.final_groups(runs), [3.0])
    # Assert: one user-level cell per method and epsilon; the paired difference is user - example, seed by seed
    assert ("lalora@user", 3.0) in configs and ("lalora", 3.0) in configs
    assert privacy_utility.split_unit("lalora@user") == ("lalora", "user")
    row = next(line for line in lines if line.startswith("| LA-LoRA |"))
    assert "-4.50 ± 0.71 (n=2" in row and "| 0.800 | 1.100 | 300–330 |" in row
