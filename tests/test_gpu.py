"""Guarantees checked on a CUDA device (marker `gpu`: not in the default run; skipped without CUDA).

- Exactness on CUDA: per-sample gradients of both backends equal a one-example-at-a-time loop on the GPU, fp32 with
  TF32 off, |got - ref| <= 1e-6 + 1e-5 * |ref| (the CPU tolerance of test_grad_sample.py).
- The DP step: the same per-sample gradients give the same privatised gradient and update on CUDA as on CPU
  (zero noise; fp32 rounding only), and CUDA noise has std sigma * C / B within 1 % over 102,400 coordinates.
- bf16: per-sample gradients of a bf16 model (bf16 weights, or fp32 weights under bf16 autocast) are within 5 %
  of fp32's (relative L2 error of each tensor and of each example's norm). Measured on CPU: at most 1.8 %.
- Resume: a federated run on CUDA killed after round 1 and resumed saves the same adapter tensors, bit for bit,
  as the uninterrupted run. Deterministic algorithms are on (warn only) for it, since CUDA's memory-efficient
  attention backward otherwise sums with atomics, so two identical runs could differ in the last bits.

    python -m pytest -m gpu tests/test_gpu.py -q      # benchmarks/device_check.sh runs it on a GPU machine
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings

# Deterministic cuBLAS for the resume test; read when cuBLAS starts, so set before the first CUDA matmul.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_grad_sample import assert_matches_reference, make_batch, peft_model, set_phase  # noqa: E402

from peft_lalora.privacy import GradientPrivatizer  # noqa: E402
from peft_lalora.privacy.grad_sample import select_backend  # noqa: E402
from peft_lalora.privacy.secure_random import SecureRandom

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]

C, KERNEL, BF16_TOL = 0.7, (1, 4, 6, 4, 1), 0.05


@pytest.fixture(autouse=True)
def fp32_without_tf32():
    """TF32 off for matmuls and cuDNN convolutions (patch embeddings, the low-pass filter): fp32 is fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_model(name: str):
    return copy.deepcopy(peft_model(name)).to("cuda")


def to(batch: dict, device, dtype=None) -> dict:
    return {
        k: v.to(device, dtype if dtype is not None and v.is_floating_point() else v.dtype) for k, v in batch.items()
    }


# ----- exactness on CUDA -----------------------------------------------------------------------------------------
CASES = [
    ("bert", "hooks"),
    ("roberta", "hooks"),
    ("vit", "hooks"),
    ("llama", "hooks"),
    ("swin", "func"),
    ("vit", "func"),
]


@pytest.mark.parametrize("batch_size", [3, 16])
@pytest.mark.parametrize("factors", ["B", "A"])
@pytest.mark.parametrize("name,backend_name", CASES)
def test_cuda_per_sample_gradients_equal_one_example_loop(name, backend_name, factors, batch_size):
    # Prepare
    model = cuda_model(name)
    params = set_phase(model, factors)
    batch = to(make_batch(name, batch_size, seed=batch_size), "cuda")
    with select_backend(model, backend_name) as backend:
        # Execute and Assert: against the loop on the same device (ATOL 1e-6, RTOL 1e-5)
        assert_matches_reference(backend, model, batch, params)
        grads, losses = backend.compute(batch, params)
    assert losses.is_cuda and all(g.is_cuda for g in grads.values())


# ----- the DP step: CUDA against CPU -----------------------------------------------------------------------------
def grad_samples(seed: int = 0) -> dict:
    """Per-sample gradients of two LoRA factors and a head for 6 examples: tiny, huge (clipped) and one NaN."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3]).view(6, 1, 1)
    out = {
        "a": torch.randn(6, 4, 96, generator=g) * scales,
        "b": torch.randn(6, 80, 4, generator=g) * scales,
        "head": torch.randn(6, 2, 96, generator=g) * scales,
    }
    out["b"][2, 0, 0] = float("nan")  # dropped by the clip stage on both devices
    return out


def dp_step(device: str, samples: dict, sigma: float = 0.0) -> tuple[dict, dict, torch.Tensor]:
    """clip, sum, noise, scale, low-pass and one SGD step on `device`: (noisy gradients, new params, clip factors)."""
    params = {n: torch.nn.Parameter(torch.ones(g.shape[1:], device=device)) for n, g in samples.items()}
    opt = GradientPrivatizer(
        torch.optim.SGD(params.values(), lr=0.5),
        noise_multiplier=sigma,
        per_sample_max_grad_norm=C,
        factor_of={"a": "A", "b": "B"},
        lowpass_kernel=KERNEL,
        generator=SecureRandom(0, "noise"),
    )
    samples = {n: g.to(device) for n, g in samples.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped NaN example's LALoraWarning
        factors = opt.clip_factors(samples)
        grads = opt.step(samples, params, expected_batch_size=6.5)
    assert opt.dropped_samples == 2  # counted once by clip_factors, once inside step
    return grads, {n: p.detach() for n, p in params.items()}, factors


def assert_close_to_cpu(got: dict, want: dict, rel: float) -> None:
    for name, value in want.items():
        assert got[name].is_cuda
        scale = float(value.abs().max())
        torch.testing.assert_close(
            got[name].cpu(), value, rtol=rel, atol=rel * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_dp_step_on_cuda_equals_cpu_for_the_same_per_sample_gradients():
    samples = grad_samples()
    cpu_grads, cpu_params, cpu_factors = dp_step("cpu", samples)
    grads, params, factors = dp_step("cuda", samples)
    torch.testing.assert_close(factors.cpu(), cpu_factors, rtol=1e-12, atol=0.0)  # float64 norms
    assert int((cpu_factors == 1.0).sum()) >= 1 and int((cpu_factors < 1.0).sum()) >= 2  # clipped and unclipped
    assert_close_to_cpu(grads, cpu_grads, rel=1e-5)  # fp32 sums in another order
    assert_close_to_cpu(params, cpu_params, rel=1e-5)


def test_dp_step_on_cuda_with_torch_default_tf32_flags_is_within_tf32_rounding():
    """torch's defaults allow TF32 in cuDNN convolutions, which the low-pass filter is: 10-bit mantissas."""
    torch.backends.cudnn.allow_tf32 = True  # torch's default; the fixture restores it
    samples = grad_samples()
    cpu_grads, _, _ = dp_step("cpu", samples)
    grads, _, _ = dp_step("cuda", samples)
    assert_close_to_cpu(grads, cpu_grads, rel=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_cuda_noise_std_is_sigma_c_over_b(seed):
    sigma, batch = 1.3, 16
    param = torch.nn.Parameter(torch.zeros(400, 256, device="cuda"))  # 102,400 coordinates
    opt = GradientPrivatizer(
        torch.optim.SGD([param], lr=0.1),
        noise_multiplier=sigma,
        per_sample_max_grad_norm=C,
        generator=SecureRandom(seed, "noise"),
    )
    noise = opt.privatize({"w": torch.zeros(batch, 400, 256, device="cuda")}, {"w": param}, batch)["w"]
    assert noise.is_cuda
    assert abs(float(noise.std()) / (sigma * C / batch) - 1) < 0.01
    assert abs(float(noise.mean())) < 5 * sigma * C / batch / 320  # 5 standard errors


# ----- bf16 against fp32 -------------------------------------------------------------------------------------------
def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("mode", ["weights", "autocast"])
@pytest.mark.parametrize("name,backend_name", [("roberta", "hooks"), ("vit", "hooks"), ("vit", "func")])
def test_bf16_per_sample_gradients_within_5_percent_of_fp32(name, backend_name, mode):
    # Prepare: the fp32 reference on CUDA
    model = cuda_model(name)
    params = set_phase(model, "B")
    batch = to(make_batch(name, 8, seed=1), "cuda")
    with select_backend(model, backend_name) as backend:
        ref, _ = backend.compute(batch, params)
    if mode == "weights":
        model = copy.deepcopy(model).to(torch.bfloat16)
        params, batch, context = set_phase(model, "B"), to(batch, "cuda", torch.bfloat16), contextlib.nullcontext()
    else:  # fp32 weights, bf16 matmuls
        context = torch.autocast("cuda", dtype=torch.bfloat16)
    # Execute
    with select_backend(model, backend_name) as backend, context:
        got, losses = backend.compute(batch, params)
    # Assert: hooks give bf16 gradients under autocast, func fp32 ones; both within BF16_TOL of fp32
    assert torch.isfinite(losses).all()
    for pname, value in ref.items():
        assert got[pname].dtype in (torch.bfloat16, torch.float32) and torch.isfinite(got[pname]).all()
        assert relative_error(got[pname], value) < BF16_TOL, pname
        norms, ref_norms = got[pname].float().flatten(1).norm(dim=1), value.flatten(1).norm(dim=1)
        assert float(((norms - ref_norms).abs() / ref_norms).max()) < BF16_TOL, pname


def test_bf16_model_dp_step_keeps_bf16_weights_and_moves_only_active_tensors():
    from peft_lalora.privacy import PrivateStep, active_parameters

    model = cuda_model("roberta").to(torch.bfloat16)
    set_phase(model, "B")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = PrivateStep(
        model,
        torch.optim.SGD(active_parameters(model).values(), lr=0.5),
        noise_multiplier=1.0,
        per_sample_max_grad_norm=C,
        lowpass_kernel=KERNEL,
        generator=SecureRandom(0, "noise"),
    )
    out = step(to(make_batch("roberta", 8), "cuda", torch.bfloat16), expected_batch_size=8)
    step.close()
    active = set(active_parameters(model))
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.isfinite(param).all(), name
        assert (not torch.equal(param.detach(), before[name])) == (name in active), name
    assert out["batch_size"] == 8


# ----- resume on CUDA ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def deterministic_algorithms():
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def test_resume_on_cuda_is_bit_identical(tmp_path):
    from fed_helpers import toy_args, toy_dataset, toy_model  # datasets only here: the other checks run without it
    from safetensors.torch import load_file
    from test_trainer_resume import KillAfterRound

    from peft_lalora import FederatedDPArguments, FederatedDPTrainer

    # Prepare: a fixed noise seed where the arguments have one (else the noise derives from `seed`)
    seeded = {"noise_seed": 0} if "noise_seed" in FederatedDPArguments.__dataclass_fields__ else {}

    def trainer(path, callbacks=None):
        return FederatedDPTrainer(
            model=toy_model(device="cuda"),
            args=toy_args(path, num_rounds=3, **seeded),
            train_dataset=toy_dataset(),
            callbacks=callbacks,
        )

    def saved_adapter(run, path):
        run.save_model(str(path))
        return load_file(str(path / "adapter_model.safetensors"))

    with deterministic_algorithms():
        full = trainer(tmp_path / "full")
        full.train()
        assert full.args.device.type == "cuda" and all(p.is_cuda for p in full.model.parameters())
        expected = saved_adapter(full, tmp_path / "full_out")
        # Execute: killed at the end of round 1, resumed by a fresh trainer
        killed = trainer(tmp_path / "killed", callbacks=[KillAfterRound(1)])
        with pytest.raises(KeyboardInterrupt):
            killed.train()
        resumed = trainer(tmp_path / "killed")
        resumed.train(resume_from_checkpoint=True)
        got = saved_adapter(resumed, tmp_path / "resumed_out")
        differ = [n for n in expected if not torch.equal(got[n], expected[n])]
        if differ:  # tell a resume bug from run-to-run nondeterminism
            again = trainer(tmp_path / "again")
            again.train()
            rerun = saved_adapter(again, tmp_path / "again_out")
            same = all(torch.equal(rerun[n], expected[n]) for n in expected)
            worst = max(float((got[n].double() - expected[n].double()).abs().max()) for n in differ)
            pytest.fail(
                f"{len(differ)} of {len(expected)} adapter tensors differ after resume (max abs diff {worst:.3g}, "
                f"e.g. {differ[0]}); two uninterrupted runs are {'' if same else 'NOT '}bit-identical."
            )
    # Assert
    assert set(got) == set(expected) and expected
    assert resumed.ledger.state_dict() == full.ledger.state_dict()
    assert [log["round"] for log in resumed.state.log_history if "round" in log] == [1.0, 2.0, 3.0]
