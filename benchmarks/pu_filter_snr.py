"""Why the low-pass filter and the schedule matter little in `privacy_utility.py`'s offline setting: the signal-to-
noise ratio of each LoRA factor's DP gradient, with and without the [1, 4, 6, 4, 1] / 16 filter.

Same model, head and client data as the benchmark's defaults. B is set to N(0, 0.02) (a trained-looking B, so that
A's gradient is not zero). The clean signal g is the mean over 128 examples of client 0 of per-example gradients of
(active factor + head), clipped jointly to C = 1 (a one-example-at-a-time loop, independent of the library); the
noise is N(0, (sigma C / B)^2) per coordinate with the benchmark's sigma and batch 32. Reported per LoRA tensor:
|g|, the share of the head in the clipped gradient, the signal kept by the filter |F g| / |g|, SNR = |g|^2 / E|xi|^2
raw and filtered (white noise keeps 70/256 = 0.273 of its energy), and the cosine of the noisy gradient with g.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/pu_filter_snr.py
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/pu_filter_snr.py --vision fashion-vit
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/pu_filter_snr.py --head frozen \
        --name privacy_utility_frozen_head
Any `privacy_utility.py` flag selects the setting; sigma per epsilon is read from that setting's results JSON
(`<out>/<name>.json`) when it exists, else the text track's values below are used.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import _pu_setup  # noqa: E402
import privacy_utility  # noqa: E402

from peft_lalora import lowpass_filter  # noqa: E402

SIGMAS = {1: 1.3125, 3: 0.8252, 6: 0.5957}  # the benchmark's calibrated sigma at epsilon 1, 3, 6 (from its JSON)


def clipped_mean(model, params, names, dataset, collator, n: int) -> dict:
    acc = {k: torch.zeros_like(params[k]) for k in names}
    for i in range(n):
        loss = model(**collator([dataset[i]])).loss
        grads = torch.autograd.grad(loss, [params[k] for k in names])
        factor = min(1.0, 1.0 / float(torch.sqrt(sum((g**2).sum() for g in grads))))
        for k, g in zip(names, grads):
            acc[k] += g * factor
    return {k: v / n for k, v in acc.items()}


def short(name: str) -> str:
    """'layer 0 query.lora_B' from a peft parameter name (BERT and ViT)."""
    layer = re.search(r"layers?\.(\d+)\.", name)
    return f"layer {layer.group(1) if layer else '?'} " + name.split("attention.")[-1].split(".default")[0].replace(
        "self.", ""
    )


def sigmas_of(path: str) -> dict:
    """{epsilon: sigma} of a finished privacy_utility run (its calibrated noise multipliers), else SIGMAS."""
    if not os.path.exists(path):
        return SIGMAS
    with open(path) as handle:
        runs = json.load(handle)["runs"]
    return {r["epsilon_target"]: r["noise_multiplier"] for r in runs if r["epsilon_target"] is not None}


def main(argv=None) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    opts = privacy_utility.parse(sys.argv[1:] if argv is None else argv)
    setup = _pu_setup.setup_of(opts)
    sigmas = sigmas_of(os.path.join(opts.out, opts.name + ".json"))
    print(
        f"# setting: {' '.join(sys.argv[1:] if argv is None else argv) or 'text track defaults'}; sigma by epsilon "
        f"{ {k: round(v, 3) for k, v in sorted(sigmas.items())} }"
    )
    model = _pu_setup.probe_model(setup)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    for active in ("B", "A"):
        names = [k for k in params if f"lora_{active}" in k or "classifier" in k]
        g_all = clipped_mean(model, params, names, setup.clients[0], setup.collator, 128)
        total = torch.sqrt(sum((g**2).sum() for g in g_all.values()))
        head = torch.sqrt(sum(((g**2).sum() for k, g in g_all.items() if "classifier" in k), torch.tensor(0.0)))
        print(f"active {active}: |clipped mean gradient| = {total:.4f}, of which the head {head:.4f}")
        for eps, sigma in sorted(sigmas.items()):
            std = sigma * opts.clip / opts.batch_size
            for k, g in g_all.items():
                if "classifier" in k:
                    continue
                xi = torch.randn(100, *g.shape) * std
                fxi = torch.stack([lowpass_filter(x, active) for x in xi])
                fg = lowpass_filter(g, active)
                snr, snr_f = (g**2).sum() / (xi**2).sum((1, 2)).mean(), (fg**2).sum() / (fxi**2).sum((1, 2)).mean()
                cos = torch.nn.functional.cosine_similarity
                c_raw = float(cos((g + xi).flatten(1), g.flatten()[None]).mean())
                c_f = float(
                    cos(torch.stack([lowpass_filter(g + x, active) for x in xi]).flatten(1), g.flatten()[None]).mean()
                )
                print(
                    f"  eps={eps} sigma={sigma:.3f} {short(k):22s} "
                    f"|g|={g.norm():.2e} |Fg|/|g|={fg.norm() / g.norm():.3f} SNR raw={snr:.2e} "
                    f"filtered={snr_f:.2e} (x{snr_f / snr:.2f}) cos(noisy,g)={c_raw:+.4f} filtered {c_f:+.4f}"
                )
    a = next(p for k, p in params.items() if "lora_A" in k)
    print(
        f"A at init: std {a.std():.4f} (r x d_in = {tuple(a.shape)}); scale s = lora_alpha / r = "
        f"{opts.lora_alpha / opts.rank:g}: noise xi_B on B reaches W as s * xi_B @ A, per entry std "
        f"s * sqrt(r) * std(A) = {opts.lora_alpha / opts.rank * opts.rank**0.5 * float(a.std()):.3f} x std(xi_B)"
    )


if __name__ == "__main__":
    main()
