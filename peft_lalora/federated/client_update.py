"""A client's update, the public unit of a round that both engines call: the in-process trainer (one job, all
clients) and a Flower ClientApp (one machine, one client). Given the model, the global adapter, the client's
shard, the round and the settings, it runs the local steps of the schedule and returns the delta of what it
trained (the factors that trained, plus the head), with counts. Privacy accounting is the caller's: it charges
`local` steps before calling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..privacy.engine import NonPrivateStep, PrivateStep
from ..privacy.quantized import prepare_quantized_layers
from ..privacy.secure_random import SecureRandom
from ..tuner.roles import tensor_role, trained_tensor_names
from .aggregation import adapter_delta
from .client import ClientShard
from .seeding import global_rng


class ClientUpdateError(RuntimeError):
    """A client's local round produced nothing that may be sent (its update is dropped); `dropped` counts
    the examples dropped for a non-finite gradient. Its texts hold no value computed from the examples (they may
    be logged under DP: `disclosure.VALUE_FREE_ERRORS`)."""

    def __init__(self, message: str, dropped: int = 0):
        super().__init__(message)
        self.dropped = dropped


@dataclass(frozen=True)
class LocalConfig:
    """The local half of the settings: steps per round, the expected Poisson batch, the client optimizer."""

    local_steps: int
    batch_size: int
    local_optimizer: str = "sgd"
    local_momentum: float = 0.0
    weight_decay: float = 0.0
    lora_b_lr_ratio: float = 1.0
    adam_betas: tuple = (0.9, 0.999)
    adam_epsilon: float = 1e-8

    @classmethod
    def from_args(cls, args) -> LocalConfig:
        """From `FederatedDPArguments` (`per_device_train_batch_size` is the expected Poisson batch)."""
        same = ("local_steps", "local_optimizer", "local_momentum", "weight_decay", "lora_b_lr_ratio", "adam_epsilon")
        return cls(
            batch_size=args.per_device_train_batch_size,
            adam_betas=(args.adam_beta1, args.adam_beta2),
            **{name: getattr(args, name) for name in same},
        )


@dataclass
class ClientUpdate:
    """What a client sends (`delta`: only the tensors it trained) and what it reports."""

    delta: dict
    num_examples: int  # the client's shard size n_k
    loss: float
    steps: int  # local steps run (and charged)
    sampled: int  # examples drawn by Poisson sampling over the steps
    dropped: int  # of those, dropped for a non-finite gradient


def make_stepper(
    model,
    *,
    dp: bool,
    noise_multiplier: float = 0.0,
    per_sample_max_grad_norm: float = 1.0,
    adapter_name: str = "default",
    backend: str = "auto",
    autocast_dtype: Optional[torch.dtype] = None,
    head_max_grad_norm: Optional[float] = None,
):
    """The local step of the adapter's method: DP-SGD (with the config's low-pass filter and, with
    `head_max_grad_norm`, clipping groups {LoRA factors: C, head: C_h}) or the non-private one."""
    config = model.peft_config[adapter_name]
    prepare_quantized_layers(model)  # before any forward: bitsandbytes' CPU eval kernel has no backward
    if not dp:
        return NonPrivateStep(model, None, autocast_dtype=autocast_dtype)
    return PrivateStep(
        model,
        None,
        noise_multiplier=noise_multiplier,
        per_sample_max_grad_norm=per_sample_max_grad_norm,
        lowpass_kernel=config.lowpass_kernel if config.lowpass else None,
        backend=backend,
        adapter_name=adapter_name,
        autocast_dtype=autocast_dtype,
        head_max_grad_norm=head_max_grad_norm,
    )


def stepper_from_args(model, args, noise_multiplier: float, adapter_name: str = "default"):
    """`make_stepper` with the settings of `FederatedDPArguments` (DP on or off, clip norms, backend, bf16), for
    the in-process trainer and a Flower client alike."""
    return make_stepper(
        model,
        dp=args.dp,
        noise_multiplier=noise_multiplier,
        per_sample_max_grad_norm=args.per_sample_max_grad_norm,
        adapter_name=adapter_name,
        backend=args.per_sample_grad_backend,
        autocast_dtype=torch.bfloat16 if args.bf16 else None,
        head_max_grad_norm=args.per_sample_head_max_grad_norm,
    )


def make_optimizer(
    model, lr: float, local: LocalConfig, adapter_name: str = "default", params: Optional[dict] = None
) -> torch.optim.Optimizer:
    """The client optimizer over the adapter's tensors, one parameter group per role (B may have its own rate).
    `params`: `dict(model.named_parameters())`, when the caller has it already."""
    params = dict(model.named_parameters()) if params is None else params
    groups = {"A": [], "B": [], "head": []}
    for name in params:  # the adapter's tensors in model order, as `adapter_tensor_names` lists them
        role = tensor_role(name, adapter_name)
        if role is not None:
            groups[role].append(params[name])
    ratios = {"A": 1.0, "B": local.lora_b_lr_ratio, "head": 1.0}
    param_groups = [{"params": p, "lr": lr * ratios[k]} for k, p in groups.items() if p]
    if local.local_optimizer == "adamw":
        return torch.optim.AdamW(
            param_groups, lr=lr, weight_decay=local.weight_decay, betas=tuple(local.adam_betas), eps=local.adam_epsilon
        )
    return torch.optim.SGD(param_groups, lr=lr, momentum=local.local_momentum, weight_decay=local.weight_decay)


@torch.no_grad()
def load_state(model, state: dict, params: Optional[dict] = None) -> None:
    """Copy the adapter tensors `state` into the model (never copies the model). `params`: as in `make_optimizer`."""
    params = dict(model.named_parameters()) if params is None else params
    for name, value in state.items():
        params[name].copy_(value)


def client_update(
    *,
    model,
    stepper,
    shard: ClientShard,
    global_state: dict,
    round_idx: int,
    client: int,
    lr: float,
    local: LocalConfig,
    private_seed,
    adapter_name: str = "default",
) -> ClientUpdate:
    """
    Load `global_state` into `model`, run `local.local_steps` steps of the schedule, each on a Poisson batch of
    `shard`'s examples (or of its users, one example each: `ClientShard.sample`), and return the delta of the factors
    that trained plus the head. Every random draw derives from (`private_seed`, round, client), the run's private
    root (`seeding.secret_seed`, or a fixed `noise_seed`), never the public seed of a DP run: the batches and the
    noise from ChaCha20 streams keyed by it (`SecureRandom`), dropout (not part of the mechanism) from torch's
    generator under a seed derived from it. Raises `ClientUpdateError` when every sampled example was dropped for a
    non-finite gradient (noise only) or the update is not finite; any other error of the local round propagates.
    """
    params = dict(model.named_parameters())  # one walk of the model per client
    load_state(model, global_state, params)
    tuner, batch_size = model.base_model, local.batch_size
    sampler = SecureRandom(private_seed, "sample", round_idx, client)
    picker = SecureRandom(private_seed, "user-example", round_idx, client)  # user-level DP: which example of a user
    trained, losses, sampled, dropped = set(), [], 0, 0
    # dropout takes no generator; the caller's RNG is kept
    with global_rng(private_seed, "dropout", round_idx, client, device=shard.device):
        stepper.reset(
            make_optimizer(model, lr, local, adapter_name, params),
            SecureRandom(private_seed, "noise", round_idx, client),
        )
        for step in range(local.local_steps):
            factors = tuner.trainable_factors(round_idx, step)
            tuner.set_trainable_factors(factors)
            trained |= factors
            indices = shard.sample(batch_size, sampler, picker)
            if not indices and not stepper.private:
                continue  # nothing to learn from, and no privacy mechanism that must run
            out = stepper(shard.batch(indices), expected_batch_size=batch_size)
            sampled += out["batch_size"]
            dropped += out.get("dropped", 0)
            if math.isfinite(out["loss"]):
                losses.append(out["loss"])
    if sampled and dropped == sampled:
        raise ClientUpdateError(  # no count in the text: it is computed from the data without noise
            "every sampled example had a non-finite gradient and was dropped: the update would be noise only",
            dropped=dropped,
        )
    sent = trained_tensor_names(global_state, adapter_name, trained)
    delta = adapter_delta({n: params[n].detach() for n in sent}, {n: global_state[n] for n in sent})
    if not all(bool(torch.isfinite(v).all()) for v in delta.values()):
        raise ClientUpdateError("the client's update is not finite (NaN or inf): lower the learning rate")
    loss = sum(losses) / len(losses) if losses else float("nan")
    return ClientUpdate(delta, len(shard), loss, local.local_steps, sampled, dropped)
