"""Shared by the QLoRA tests: a tiny Llama reloaded in 4 / 8 bits through bitsandbytes, instruction-like examples,
and the independent reference (each example alone through the same quantized model, plain autograd)."""

from __future__ import annotations

import os

import torch
from datasets import Dataset
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from peft_lalora import LALoraConfig
from peft_lalora.privacy.losses import per_example_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL, RTOL = 1e-6, 1e-5
VOCAB = 64
# bitsandbytes' 4-bit blocks are 64 wide: every quantized dimension is a multiple of 64
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)
MODES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True, llm_int8_threshold=0.0),
}


def quantized(base_dir: str, mode: str = "nf4", method: str = "dplora", kbit: bool = False, randomize: bool = True):
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**MODES[mode]))
    if kbit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LALoraConfig.for_method(
        method, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    if randomize:  # non-zero B so that A's gradient is non-zero too
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return peft_model


def rows(n: int = 5, seed: int = 0) -> list[dict]:
    """Instruction-like examples of several lengths: prompts masked with -100, responses counted."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, VOCAB, (2 + i % 4,), generator=g).tolist()
        response = torch.randint(3, VOCAB, (1 + (i * 3) % 4,), generator=g).tolist() + [2]
        out.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return out


def collate(examples: list[dict]) -> dict:
    """Right padding with id 0, labels -100 on the padding, positions from 0 per example."""
    length = max(len(r["input_ids"]) for r in examples)
    ids, labels, mask = [], [], []
    for r in examples:
        pad = length - len(r["input_ids"])
        ids.append(r["input_ids"] + [0] * pad)
        labels.append(r["labels"] + [-100] * pad)
        mask.append([1] * len(r["input_ids"]) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def reference(model, examples: list[dict], params: dict) -> dict:
    """Each example alone through the same quantized model, unpadded, in the model's current mode; plain autograd.
    (In eval mode, bitsandbytes' CPU backend switches 4-bit layers to a kernel without a backward: the tests run
    the reference in training mode, as the DP step does; these configs have no dropout.)"""
    grads = {n: [] for n in params}
    for r in examples:
        loss = per_example_loss(
            model(input_ids=torch.tensor([r["input_ids"]])), {"labels": torch.tensor([r["labels"]])}
        )
        for n, g in zip(params, torch.autograd.grad(loss.sum(), list(params.values()))):
            grads[n].append(g)
    return {n: torch.stack(v) for n, v in grads.items()}


def assert_exact(got: dict, ref: dict) -> None:
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=ATOL, rtol=RTOL, msg=lambda m, n=n: f"{n}: {m}")
    assert max(float(r.abs().max()) for r in ref.values()) > 1e-3  # not trivially zero


def dataset(n: int = 40) -> Dataset:
    examples = rows(n, seed=3)
    return Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in examples], "labels": [r["labels"] for r in examples]}
    )
