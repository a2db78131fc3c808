"""Mean pooling in place of BERT's [CLS] pooler, saved with an adapter and applied before loading it.

A sentence-transformer such as all-MiniLM-L6-v2 was trained with mean pooling and never trained BERT's [CLS]
pooler, on which `...ForSequenceClassification` puts its head (measured on all-MiniLM-L6-v2: the pooler's output
has a per-dimension std of ~0.06; a logistic probe on it reaches 0.66 on Rotten Tomatoes, 0.73 on the mean of the
token states, and under DP the default job's head stays at the majority class, 0.576). `use_mean_pooling` swaps
the pooler for a parameter-free masked mean, layer-normalised and standardised per dimension with statistics of
unlabeled held-out inputs (`standardise`: not client data, so they cost no privacy). A head trained on it needs
the same swap, with the same statistics, wherever the adapter is loaded. peft cannot rebuild a module that is not
part of the base architecture, so the statistics travel next to the adapter as `pooling.safetensors`
(`save_pooling`; `push_adapter_folder` uploads it) and `load_pooling` applies them to the base model before
`PeftModel.from_pretrained`:

    base = AutoModelForSequenceClassification.from_pretrained(base_id, num_labels=2)
    load_pooling(base, adapter)                  # no-op for adapters trained on the model's own pooler
    model = PeftModel.from_pretrained(base, adapter)

Why in the library and not in the recipes: whoever loads a published adapter installs peft_lalora, not its
recipes, and the model card's loading code (`hub/card_template.md`) calls `load_pooling`; it works for any
BERT-style `...ForSequenceClassification` (an encoder with a `pooler`), not only the recipes' model.
"""

from __future__ import annotations

import os
import warnings

import torch
from safetensors.torch import load_file

from .errors import ConfigError, LALoraWarning
from .federated.state_io import save_tensors

POOLING_FILE = "pooling.safetensors"


class MeanPooler(torch.nn.Module):
    """Masked mean of the last hidden states, layer-normalised (no affine weights), then standardised."""

    def __init__(self, center: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        super().__init__()
        self.mask = None
        self.register_buffer("center", center)
        self.register_buffer("scale", scale)

    def forward(self, hidden_states):
        if self.mask is None:
            mean = hidden_states.mean(1)
        else:
            mask = self.mask.to(hidden_states.dtype).unsqueeze(-1)
            mean = (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        features = torch.nn.functional.layer_norm(mean, mean.shape[-1:])
        if self.center is not None:
            features = (features - self.center) / self.scale
        return features


def _encoder(model):
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or not hasattr(encoder, "pooler"):
        raise ConfigError(
            f"`model` must be a BERT-style `...ForSequenceClassification` whose encoder has a "
            f"`pooler`, got {type(model).__name__}. Pass the base transformers model (for a "
            "PeftModel, `model.get_base_model()`)."
        )
    return encoder


def use_mean_pooling(model, center: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> MeanPooler:
    """Replace the encoder's pooler of a BERT-style `...ForSequenceClassification` by `MeanPooler` (once)."""
    encoder = _encoder(model)
    if isinstance(encoder.pooler, MeanPooler):
        encoder.pooler.center, encoder.pooler.scale = center, scale
        return encoder.pooler
    pooler = MeanPooler(center, scale)
    encoder.pooler = pooler

    def capture(module, args, kwargs):
        pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(capture, with_kwargs=True)
    return pooler


@torch.no_grad()
def standardise(model, dataset, collator, batch_size: int = 128) -> None:
    """Set the `MeanPooler`'s per-dimension centre and scale from the unlabeled inputs of `dataset` (held-out data,
    never client data: the statistics are released with the adapter)."""
    encoder = _encoder(model)
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


def save_pooling(model, folder: str) -> str | None:
    """Write the statistics of `model`'s standardised `MeanPooler` to `folder/pooling.safetensors`; returns the
    path, or None when the model keeps its own pooler (nothing to save)."""
    pooler = _encoder(model).pooler
    if not isinstance(pooler, MeanPooler):
        return None
    if pooler.center is None:
        raise ConfigError(
            "`model` has a MeanPooler without statistics: set its `center` and `scale` (`standardise`) "
            "before saving, or the loaded model cannot reproduce its logits."
        )
    path = os.path.join(folder, POOLING_FILE)
    save_tensors(path, {"center": pooler.center, "scale": pooler.scale}, metadata={"pooling": "mean"})  # atomic
    return path


def load_pooling(model, adapter: str, *, revision: str | None = None, token: str | None = None) -> bool:
    """
    Apply the pooling an adapter was trained with: when the adapter folder or Hub repo `adapter` holds
    `pooling.safetensors`, swap `model`'s pooler for a `MeanPooler` with the saved statistics and return True;
    otherwise leave `model` unchanged and return False. Call it on the base model, before
    `PeftModel.from_pretrained(model, adapter)`.
    """
    path = _find(adapter, revision=revision, token=token)
    if path is None:
        return False
    stats = load_file(path)
    encoder = _encoder(model)
    hidden = model.config.hidden_size
    if set(stats) != {"center", "scale"} or any(t.shape != (hidden,) for t in stats.values()):
        raise ConfigError(
            f"`adapter` {adapter!r} holds a {POOLING_FILE} with tensors "
            f"{ {k: tuple(v.shape) for k, v in stats.items()} }, expected `center` and `scale` of "
            f"shape ({hidden},) for this model (hidden_size {hidden}). Load the base model the adapter "
            "was trained on."
        )
    device = next(encoder.parameters()).device
    use_mean_pooling(model, stats["center"].to(device), stats["scale"].to(device))
    return True


def _find(adapter: str, *, revision, token) -> str | None:
    if not isinstance(adapter, (str, os.PathLike)) or not str(adapter):
        raise ConfigError(f"`adapter` must be an adapter folder or a Hub repo id, got {adapter!r}.")
    if os.path.isdir(adapter):
        path = os.path.join(adapter, POOLING_FILE)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        return hf_hub_download(str(adapter), POOLING_FILE, revision=revision, token=token)
    except RemoteEntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        warnings.warn(
            f"Could not check whether the Hub repo {adapter!r} holds {POOLING_FILE} (offline, and not in "
            "the cache); the model keeps its own pooler. An adapter trained with mean pooling then gives "
            "other logits: load it once online, or pass its downloaded folder.",
            LALoraWarning,
            stacklevel=3,
        )
        return None
