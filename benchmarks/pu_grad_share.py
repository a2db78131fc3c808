"""How the per-example clip budget C is shared between the head and the LoRA factors in `privacy_utility.py`'s two
offline tracks, at the start of training (why the methods, which differ only in how the factors train, end up
close together).

For 128 examples of client 0: the per-example gradient norm of the head, of all LoRA A and of all LoRA B tensors
(one example at a time with autograd: independent of the library's per-sample machinery), with B drawn from
N(0, 0.02) so that A's gradient is not zero (at init B = 0). Joint clipping to C scales every example by
min(1, C / |g|): the LoRA factors keep |g_lora| / |g| of the budget. Reported: medians and the median share.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/pu_grad_share.py
"""

from __future__ import annotations

import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import _pu_report  # noqa: E402
import _pu_setup  # noqa: E402
import privacy_utility  # noqa: E402

TRACKS = {
    "text (MiniLM 1 layer, Rotten Tomatoes)": [],
    "vision (tiny ViT from Fashion-MNIST, MNIST digits)": ["--vision", _pu_setup.FASHION_VIT],
}


def group_of(name: str) -> str | None:
    if ".modules_to_save." in name:
        return "head"
    return "A" if ".lora_A." in name else "B" if ".lora_B." in name else None


def shares(argv: list, n: int = 128, clip: float = 1.0) -> dict:
    opts = privacy_utility.parse(argv)
    setup = _pu_setup.setup_of(opts)
    model = _pu_setup.probe_model(setup)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    norms = {"head": [], "A": [], "B": [], "all": [], "lora share after clipping": []}
    model.train()
    for i in range(n):
        loss = model(**setup.collator([setup.clients[0][i]])).loss
        grads = torch.autograd.grad(loss, list(params.values()))
        sq = {"head": 0.0, "A": 0.0, "B": 0.0}
        for name, g in zip(params, grads):
            sq[group_of(name)] += float((g**2).sum())
        total = sum(sq.values()) ** 0.5
        for k, v in sq.items():
            norms[k].append(v**0.5)
        norms["all"].append(total)
        norms["lora share after clipping"].append(min(1.0, clip / total) * (sq["A"] + sq["B"]) ** 0.5 / clip)
    count = {k: sum(p.numel() for name, p in params.items() if group_of(name) == k) for k in ("head", "A", "B")}
    return {"median": {k: statistics.median(v) for k, v in norms.items()}, "parameters": count}


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"# {_pu_report.command_line(__file__)}  (1 torch thread, 128 examples of client 0, B ~ N(0, 0.02), C = 1)")
    for track, argv in TRACKS.items():
        result = shares(argv)
        m, c = result["median"], result["parameters"]
        print(
            f"{track}: median per-example gradient norm: head {m['head']:.4g} ({c['head']} parameters), "
            f"LoRA A {m['A']:.4g} ({c['A']}), LoRA B {m['B']:.4g} ({c['B']}), all {m['all']:.4g}; "
            f"after joint clipping to C = 1 the LoRA factors hold a median {m['lora share after clipping']:.4f} of C"
        )


if __name__ == "__main__":
    main()
