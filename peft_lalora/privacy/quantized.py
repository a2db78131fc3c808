"""Quantized base layers (QLoRA): which ones training supports, and what they need first.

peft's k-bit LoRA layers keep the factors in plain `nn.Linear` leaves next to a frozen bitsandbytes base layer, so
the hooks backend samples them exactly as long as the gradient flows back through the quantized layers above and
the examples of a batch stay independent. What breaks that is handled here, before any forward pass of the run:

- bitsandbytes 0.50 (measured with 0.50.2) on a CPU with AVX512-BF16: the first eval-mode forward of a
  `Linear4bit` on an input that needs no gradient (our data pre-flight, an evaluation, `generate`) repacks its
  weight in place for a CPU inference kernel (`gemv_4bit`) without backward, which every later forward runs.
  Measured on a tiny Llama with LoRA on q/v: after one eval pass every LoRA gradient is None, so non-private
  training never moves the adapter and the hooks fail. The fast path is switched off, and a weight already
  repacked is unpacked (bitsandbytes' own inverse; its absmax keeps the bf16 rounding the user evaluated with).
- under DP, the 8-bit layer with outlier decomposition (`llm_int8_threshold` > 0, transformers' default 6.0)
  chooses its outlier columns from every token of the batch: one example's output depends on the others, so
  per-example clipping bounds nothing (like BatchNorm). Refused; 0.0 is exact (measured: per-sample gradients
  off by ~2 % with 6.0, identical with 0.0).
- a quantized layer type not known here (GPTQ, AWQ, HQQ, torchao, ...) has an unverified backward: refused,
  naming the module; so is a bitsandbytes layer that should train (a quantized head in `modules_to_save`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import UnsupportedModelError

logger = logging.getLogger(__name__)

# bitsandbytes base layers whose backward w.r.t. the input is verified here (tests/test_qlora_dp.py)
KNOWN_BNB_LAYERS = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")


def is_bnb_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes.") and type(module).__name__ in KNOWN_BNB_LAYERS


def refuse_unknown_quantized(model: nn.Module) -> None:
    """Refuse a quantized layer whose backward is not verified (anything but the bitsandbytes layers above)."""
    for name, module in model.named_modules():
        if is_bnb_layer(module):
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                raise UnsupportedModelError(
                    f"module `{name}` ({type(module).__name__}) is quantized by bitsandbytes but trainable (e.g. a "
                    "head in `modules_to_save`): its packed weight has no exact per-sample gradient. Keep it out of "
                    f"quantization with `BitsAndBytesConfig(..., llm_int8_skip_modules=[{name.split('.')[-1]!r}])`."
                )
            continue
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if any("weight" in n and not (t.is_floating_point() or t.is_complex()) for n, t in own):  # packed weight
            raise UnsupportedModelError(
                f"module `{name}` ({type(module).__module__}.{type(module).__name__}) is a quantized layer this "
                f"library does not support for training: only bitsandbytes {', '.join(KNOWN_BNB_LAYERS)} are "
                "verified to pass exact gradients to the LoRA factors below them. Load the base in 4 or 8 bits "
                "with `BitsAndBytesConfig(load_in_4bit=True)` / `(load_in_8bit=True)`, or unquantized."
            )


def prepare_quantized_layers(model: nn.Module) -> int:
    """Make the model's quantized base layers trainable through (module docstring), refusing an unverified type
    (`UnsupportedModelError`); returns how many bitsandbytes layers it holds. Idempotent."""
    refuse_unknown_quantized(model)
    count = 0
    for name, module in model.named_modules():
        if not is_bnb_layer(module):
            continue
        count += 1
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # the CPU inference kernel has no backward
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            _unpack_cpu_weight(name, module)
    return count


def _unpack_cpu_weight(name: str, module: nn.Module) -> None:
    try:  # optional (the `qlora` extra): a packed layer only exists where bitsandbytes is installed
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError as exc:  # pragma: no cover - a bitsandbytes version without the CPU packing
        raise UnsupportedModelError(
            f"module `{name}` holds a weight packed by bitsandbytes for its CPU inference kernel (no backward), and "
            "this bitsandbytes cannot unpack it. Install the `qlora` extra (bitsandbytes 0.50), or load the model "
            "again and train it before any evaluation."
        ) from exc

    with torch.no_grad():
        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, module.weight.quant_state
        )
    logger.warning(
        "module `%s`: bitsandbytes had repacked its 4-bit weight for its CPU inference kernel, which has no "
        "backward; unpacked it for training (its absmax scales keep the bf16 rounding of that packing)",
        name,
    )


def refuse_batch_dependent_quantization(model: nn.Module) -> None:
    """Under DP: an 8-bit bitsandbytes layer with outlier decomposition mixes the examples of a batch."""
    for name, module in model.named_modules():
        threshold = getattr(getattr(module, "state", None), "threshold", 0.0)
        if is_bnb_layer(module) and type(module).__name__ == "Linear8bitLt" and threshold > 0.0:
            raise UnsupportedModelError(
                f"module `{name}` (bitsandbytes Linear8bitLt) uses outlier decomposition (`llm_int8_threshold`="
                f"{threshold}): its outlier columns are chosen from the whole batch, so one example's output and "
                "gradient depend on the other examples and per-example clipping would not bound its influence. "
                "Load the base with `BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)`, or in 4 bits."
            )
