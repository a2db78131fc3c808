"""Tiny random models built from configs (milliseconds, offline), shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

TEXT_KW = dict(
    vocab_size=100,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=64,
    num_labels=2,
)


def tiny_bert(seed: int = 0, num_labels: int = 2):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**TEXT_KW, "num_labels": num_labels})).eval()


def tiny_roberta(seed: int = 0, num_labels: int = 2):
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(
        RobertaConfig(pad_token_id=1, **{**TEXT_KW, "num_labels": num_labels})
    ).eval()


def tiny_vit(seed: int = 0, num_labels: int = 3, **config):
    """`config` overrides the ViT config's fields (e.g. a 1-channel 28x28 input)."""
    torch.manual_seed(seed)
    config = {"image_size": 8, "patch_size": 4, "num_channels": 3, "num_hidden_layers": 2, **config}
    return ViTForImageClassification(
        ViTConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_labels=num_labels, **config)
    ).eval()


def tiny_swin(seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    return SwinForImageClassification(
        SwinConfig(
            image_size=16,
            patch_size=2,
            num_channels=3,
            embed_dim=8,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=2,
            num_labels=num_labels,
        )
    ).eval()


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()


# name -> (builder, target_modules, task_type, input builder)
def text_inputs(batch: int = 3, length: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 2 :] = 0  # one padded example
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs(size: int, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


MODELS = {
    "bert": (tiny_bert, ["query", "value"], "SEQ_CLS", lambda: text_inputs()),
    "roberta": (tiny_roberta, ["query", "value"], "SEQ_CLS", lambda: text_inputs()),
    "vit": (tiny_vit, ["q_proj", "v_proj"], None, lambda: image_inputs(8)),
    "swin": (tiny_swin, ["q_proj", "v_proj"], None, lambda: image_inputs(16)),
    "llama": (tiny_llama, ["q_proj", "v_proj"], "CAUSAL_LM", lambda: text_inputs()),
}


def randomize_lora(peft_model, seed: int = 1, scale: float = 0.5) -> None:
    """Give every LoRA weight non-zero values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
