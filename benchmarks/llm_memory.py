"""DP against non-private step time and peak memory for a causal LM (Llama-shaped config, random weights).

One local step of instruction tuning with LA-LoRA adapters on q_proj k_proj v_proj o_proj (r = 8), per active
factor (B, then A), at each sequence length: every example has a 16-token prompt (masked out of the loss) and a
response filling the rest. Same model, same batch, model.train().
  DP     : PrivateStep (hooks per-sample gradients, clip, sum, noise, scale, low-pass, SGD)
  non-DP : NonPrivateStep (mean of the per-example losses, backward, SGD)
Time: DP and non-DP steps interleaved in one process, median over --reps after one warm-up each.
Memory, CPU: peak RSS of the steps in a fresh subprocess per (length, mode): after building the model and one
warm-up step the kernel's peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs`), then two steps run and
VmHWM minus VmRSS before them is reported. glibc is told to map every block over 64 KiB on its own and give it
back when freed (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so that RSS follows the live tensors instead of
what an earlier step left in glibc's pools.
Memory, CUDA: `torch.cuda.max_memory_allocated` during two steps minus the memory allocated before them.
The goal (issue 13): DP step <= 1.3x the non-private step and peak memory <= 1.2x at every length.
Bases (`--bases`, both by default, in one run): `full` (fp32 weights) and `4bit` (the same weights saved and reloaded
through bitsandbytes NF4, `prepare_model_for_kbit_training`, peft's k-bit LoRA layers; skipped with a line saying
so when bitsandbytes is not installed). Goal for 4bit (issue 21): time ratio <= 1.3 at 128, <= 1.1 at 2048, peak
memory within 5 %.

    python benchmarks/llm_memory.py                                   # 8 layers, hidden 1024, 128/512/2048, batch 8
    python benchmarks/llm_memory.py --device cpu --layers 2 --hidden 256 --vocab 8000 --json out.json
    python benchmarks/llm_memory.py --bases 4bit                      # the QLoRA arm only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from peft import get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from peft_lalora import LALoraConfig  # noqa: E402
from peft_lalora.privacy import NonPrivateStep, PrivateStep  # noqa: E402
from peft_lalora.privacy.secure_random import SecureRandom  # noqa: E402

SIGMA, CLIP, LR, KERNEL, PROMPT = 1.0, 1.0, 0.05, (1, 4, 6, 4, 1), 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def quantized_base(base, args):
    """`base` saved and reloaded in 4 bits (NF4) on the device, as a QLoRA user loads a checkpoint."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        base = LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, device_map={"": args.device})
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def build(args, kind="full"):
    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=max(args.seq_len) + 1,
    )
    base = LlamaForCausalLM(config)
    base = quantized_base(base, args) if kind == "4bit" else base.to(args.device)  # before get_peft_model (#820)
    model = get_peft_model(base, LALoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained-looking B, so that A's gradient is not identically zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return model.train()


def make_batch(args, length):
    g = torch.Generator().manual_seed(args.seed + length)
    ids = torch.randint(3, args.vocab, (args.batch_size, length), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(args.device) for k, v in batch.items()}


def steppers(model, device):
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    dp = PrivateStep(
        model,
        torch.optim.SGD(params, lr=LR),
        noise_multiplier=SIGMA,
        per_sample_max_grad_norm=CLIP,
        lowpass_kernel=KERNEL,
        backend="hooks",
        generator=SecureRandom(7, "benchmark-noise"),
    )
    return {"dp": dp, "nondp": NonPrivateStep(model, torch.optim.SGD(params, lr=LR))}


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_step(model, step, batch, factor):
    model.base_model.set_trainable_factors({factor})
    step(batch, expected_batch_size=batch["labels"].shape[0])


def time_steps(args, model, steps, batch, factor):
    times = {"dp": [], "nondp": []}
    for i in range(1 + args.reps):
        for mode in ("dp", "nondp") if i % 2 == 0 else ("nondp", "dp"):
            sync()
            start = time.perf_counter()
            run_step(model, steps[mode], batch, factor)
            sync()
            if i:
                times[mode].append((time.perf_counter() - start) * 1e3)
    return {mode: statistics.median(v) for mode, v in times.items()}


# ----- memory -----------------------------------------------------------------------------------------------------
def _status_kb(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def memory_worker(args):
    """In a fresh process: one (length, mode, factor); prints the steps' peak RSS beyond what was held, in MiB."""
    model = build(args, args.bases[0])
    length = args.seq_len[0]
    batch, step = make_batch(args, length), steppers(model, args.device)[args.worker_mode]
    run_step(model, step, batch, args.factor)  # warm-up: lazy allocations, allocator pools
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    for _ in range(2):
        run_step(model, step, batch, args.factor)
    print(json.dumps({"peak_mib": (_status_kb("VmHWM") - before) / 1024}))


def cpu_memory(args, length, mode, factor, kind):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker-mode",
        mode,
        "--factor",
        factor,
        "--seq-len",
        str(length),
        "--layers",
        str(args.layers),
        "--hidden",
        str(args.hidden),
        "--vocab",
        str(args.vocab),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--device",
        "cpu",
        "--bases",
        kind,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def cuda_memory(model, step, batch, factor):
    run_step(model, step, batch, factor)
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for _ in range(2):
        run_step(model, step, batch, factor)
    sync()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# ----- main -------------------------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--factors", nargs="+", default=["B", "A"])
    p.add_argument("--bases", nargs="+", default=["full", "4bit"], choices=["full", "4bit"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--worker-mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--factor", default="B", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.worker_mode:
        return memory_worker(args)
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"
    )
    print(
        f"# {device}, torch {torch.__version__}; Llama config: {args.layers} layers, hidden {args.hidden}, "
        f"vocab {args.vocab}, batch {args.batch_size}, LoRA r=8 on {' '.join(TARGETS)}, prompt {PROMPT} tokens masked"
    )
    print("| base | length | factor | DP ms | non-DP ms | time ratio | DP peak MiB | non-DP peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for kind in args.bases:
        if kind == "4bit" and not _has_bitsandbytes():
            print("| 4bit | skipped: bitsandbytes is not installed (pip install '.[qlora]') |", flush=True)
            continue
        model = build(args, kind)
        steps = steppers(model, args.device)
        for length in args.seq_len:
            batch = make_batch(args, length)
            for factor in args.factors:
                rows.append(measure(args, model, steps, batch, kind, length, factor))
            del batch
        del model, steps
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"device": device, "args": {k: v for k, v in vars(args).items() if k != "worker_mode"}, "rows": rows},
                fh,
                indent=1,
            )


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def measure(args, model, steps, batch, kind, length, factor) -> dict:
    row = {
        "base": kind,
        "length": length,
        "factor": factor,
        **{f"{k}_ms": v for k, v in time_steps(args, model, steps, batch, factor).items()},
    }
    if not args.no_memory:
        for mode in ("dp", "nondp"):
            row[f"{mode}_peak_mib"] = (
                cuda_memory(model, steps[mode], batch, factor)
                if args.device.startswith("cuda")
                else cpu_memory(args, length, mode, factor, kind)
            )
    row["time_ratio"] = row["dp_ms"] / row["nondp_ms"]
    row["memory_ratio"] = row["dp_peak_mib"] / row["nondp_peak_mib"] if not args.no_memory else None
    mem = (
        f"{row['dp_peak_mib']:.0f} | {row['nondp_peak_mib']:.0f} | {row['memory_ratio']:.2f}x"
        if not args.no_memory
        else "- | - | -"
    )
    print(
        f"| {kind} | {length} | {factor} | {row['dp_ms']:.1f} | {row['nondp_ms']:.1f} | {row['time_ratio']:.2f}x | {mem} |",
        flush=True,
    )
    return row


if __name__ == "__main__":
    main()
