"""Mean pooling for sentence-transformer checkpoints (all-MiniLM-L6-v2 was trained with it).

BERT's classification head sits on the [CLS] pooler, which a sentence-transformer never trained: on
all-MiniLM-L6-v2 its output has a per-dimension std of ~0.06 and a logistic probe on it reaches 0.66 on Rotten
Tomatoes, against 0.73 on the mean of the token states. Under DP the head then learns nothing in the default
job's budget (measured: accuracy stays at the majority class, 0.576). `use_mean_pooling` (from
`peft_lalora.pooling`) swaps the pooler for a parameter-free masked mean, standardised per dimension with
statistics of unlabeled held-out inputs (`standardise`: not client data, so they cost no privacy). The recipe
saves the statistics in the adapter folder (`pooling.safetensors`, uploaded with the adapter);
`peft_lalora.pooling.load_pooling` applies them to a base model before `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import torch

from peft_lalora.pooling import MeanPooler, load_pooling, save_pooling, use_mean_pooling

__all__ = ["MeanPooler", "load_pooling", "save_pooling", "standardise", "use_mean_pooling"]


@torch.no_grad()
def standardise(model, dataset, collator, batch_size: int = 128) -> None:
    """Set the pooler's per-dimension centre and scale from unlabeled inputs of `dataset` (held-out data)."""
    encoder = getattr(model, model.base_model_prefix)
    pooler, feats = encoder.pooler, []
    pooler.center, pooler.scale = None, None
    was_training = model.training
    model.eval()
    columns = ("input_ids", "attention_mask", "token_type_ids")
    for i in range(0, len(dataset), batch_size):
        rows = [
            {k: v for k, v in dataset[j].items() if k in columns} for j in range(i, min(i + batch_size, len(dataset)))
        ]
        batch = collator(rows)
        feats.append(encoder(**{k: v.to(model.device) for k, v in batch.items() if k in columns}).pooler_output)
    feats = torch.cat(feats)
    pooler.center, pooler.scale = feats.mean(0), feats.std(0).clamp(min=1e-3)
    model.train(was_training)
