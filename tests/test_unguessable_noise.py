"""The DP noise cannot be re-created from anything but the private root (R21), and no key serves two releases on
different data (R22, trainer side). The first test is the attack that broke the 32-bit torch generator: read the
published adapter, recover the noise of a one-step release, and try every seed the run handed to torch."""

import hashlib
import hmac
import struct

import numpy as np
import pytest
import torch
from fed_helpers import toy_args, toy_dataset, toy_model
from scipy import stats

from peft_lalora import CheckpointMismatchError, ConfigError, FederatedDPTrainer
from peft_lalora.privacy.optimizer import GradientPrivatizer
from peft_lalora.privacy.secure_random import SecureRandom, derive_key

STREAM = 1 << 15  # values of each recorded seed's torch stream searched for the released noise
RUN = 8  # consecutive values that must match: a chance match has probability ~ STREAM * (2e-4)^8


class SeedRecorder:
    """Records every seed handed to torch: `torch.manual_seed`, any `torch.Generator(...).manual_seed`, and the
    default generator's `manual_seed` (how the library seeds dropout on CPU)."""

    def __init__(self, monkeypatch):
        self.seeds = []
        recorder, real_default = self, torch.default_generator

        class RecordingGenerator(torch.Generator):
            def manual_seed(self, seed):
                recorder.seeds.append(int(seed))
                return super().manual_seed(seed)

        class DefaultProxy:
            def manual_seed(self, seed):
                recorder.seeds.append(int(seed))
                return real_default.manual_seed(seed)

            def __getattr__(self, name):
                return getattr(real_default, name)

        real_manual_seed = torch.manual_seed

        def manual_seed(seed):
            recorder.seeds.append(int(seed))
            return real_manual_seed(seed)

        monkeypatch.setattr(torch, "Generator", RecordingGenerator)
        monkeypatch.setattr(torch, "default_generator", DefaultProxy())
        monkeypatch.setattr(torch, "manual_seed", manual_seed)
        monkeypatch.setattr(torch.random, "manual_seed", manual_seed)


def found_in_torch_stream(noise: torch.Tensor, seeds, std: float) -> list:
    """The seeds whose torch stream (`torch.normal(0, std, ...)` on CPU in float32, as the old code drew the noise)
    holds `noise`'s first RUN values consecutively, at any offset below STREAM. torch turns uniforms into normals
    in blocks of 16, so a sequence of draws whose sizes are multiples of 16 (LoRA factors, r * d) is one
    contiguous stream: the noise of any tensor of the old code lies in it."""
    target = noise.flatten()[:RUN].double()
    hits = []
    for seed in sorted(set(seeds)):
        stream = torch.normal(0.0, std, (STREAM,), generator=torch.Generator().manual_seed(seed)).double()
        if bool(((stream.unfold(0, RUN, 1) - target).abs().max(dim=1).values < 2e-4).any()):
            hits.append(seed)
    return hits


def one_step_dplora(tmp_path, **overrides):
    """A DP-LoRA run of one client, one round, one step: B = 0, so A's gradient is exactly 0 and the published A
    minus the public initial A is the noise, times -lr / B."""
    args = toy_args(
        tmp_path,
        num_clients=1,
        clients_per_round=1,
        num_rounds=1,
        local_steps=1,
        noise_seed=None,
        **overrides,
    )
    model = toy_model("dplora")
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    trainer = FederatedDPTrainer(model=model, args=args, train_dataset=toy_dataset(n=40))
    return trainer, initial


def test_no_seed_handed_to_torch_re_creates_the_released_noise(tmp_path, monkeypatch):
    # Prepare: record every seed torch receives while the run is built and trained
    recorder = SeedRecorder(monkeypatch)
    trainer, initial = one_step_dplora(tmp_path)
    # Execute: train, publish, and recover the noise from the published A (A's clipped gradient is 0)
    trainer.train()
    args = trainer.args
    published = dict(trainer.model.named_parameters())
    scale = args.per_device_train_batch_size / args.learning_rate
    noises = {n: (initial[n] - published[n].detach()) * scale for n in initial}
    # Assert: the recovered vectors are the noise (std sigma * C = 1) ...
    flat = torch.cat([v.flatten() for v in noises.values()])
    assert flat.std().item() == pytest.approx(1.0, rel=0.15)
    # ... torch was seeded during the run (the detector had seeds to try) ...
    assert recorder.seeds
    # ... and no seed it received, nor its low 32 bits (all mt19937 keeps), re-creates any released noise
    candidates = recorder.seeds + [s & 0xFFFFFFFF for s in recorder.seeds]
    for name, noise in noises.items():
        assert found_in_torch_stream(noise, candidates, std=1.0) == [], name
    # ... and the report names the generator the noise came from
    assert trainer.privacy_report()["noise_generator"].startswith("ChaCha20")


def test_the_detector_finds_noise_from_a_recorded_seed():
    # Prepare: noise as the old code drew it, from a torch generator seeded with a 63-bit seed, after other draws
    seed = 0x5DEECE66D1234567
    g = torch.Generator().manual_seed(seed)
    torch.normal(0.0, 1.0, (96,), generator=g)
    noise = torch.normal(0.0, 1.0, (4, 32), generator=g)
    # Execute / Assert: the search finds it, under the seed and under its low 32 bits alone (the CPU weakness)
    assert found_in_torch_stream(noise + 1e-5, [7, seed], std=1.0) == [seed]
    assert found_in_torch_stream(noise, [seed & 0xFFFFFFFF], std=1.0) == [seed & 0xFFFFFFFF]


def test_a_torch_generator_is_refused_as_the_noise_source():
    with pytest.raises(ConfigError, match=r"`generator` must be a peft_lalora SecureRandom .*got Generator"):
        GradientPrivatizer(
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
            noise_multiplier=1.0,
            per_sample_max_grad_norm=1.0,
            generator=torch.Generator().manual_seed(0),
        )


# ----- the generator against independent references ------------------------------------------------------------
def _hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 with an empty salt (HashLen zeros), written from the RFC."""
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


def _chacha20_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    """RFC 8439's block function (64-bit counter and 64-bit nonce, as OpenSSL's 16-byte IV lays them out)."""

    def rotl(v, c):
        return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))

    def quarter(s, a, b, c, d):
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = rotl(s[d] ^ s[a], 16)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF
        s[b] = rotl(s[b] ^ s[c], 12)
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF
        s[d] = rotl(s[d] ^ s[a], 8)
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF
        s[b] = rotl(s[b] ^ s[c], 7)

    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *struct.unpack("<8I", key)]
    state += [counter & 0xFFFFFFFF, counter >> 32, *struct.unpack("<2I", nonce)]
    work = list(state)
    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)):
            quarter(work, a, b, c, d)
        for a, b, c, d in ((0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            quarter(work, a, b, c, d)
    return struct.pack("<16I", *[(w + s) & 0xFFFFFFFF for w, s in zip(work, state)])


def test_key_and_stream_equal_an_independent_hkdf_and_chacha20():
    # Prepare: a root as `secret_seed` draws it, and the labels of one client's noise in one round
    root = "ab" * 32
    key = _hkdf_sha256(root.encode(), b"peft_lalora/v1/noise/3/1")
    reference = _chacha20_block(key, 0, bytes(8)) + _chacha20_block(key, 1, bytes(8))
    # Execute
    words = SecureRandom(root, "noise", 3, 1).words(16)
    # Assert: the same key, the same 128 keystream bytes, and uniforms from the top 53 bits of each word
    assert derive_key(root, "noise", 3, 1) == key
    assert words.tobytes() == reference
    first = int.from_bytes(reference[:8], "little")
    assert SecureRandom(root, "noise", 3, 1).uniform(1).item() == ((first >> 11) + 0.5) * 2.0**-53


def test_streams_are_deterministic_per_key_and_independent_across_keys():
    a = SecureRandom("r" * 64, "noise", 0, 0).normal(1.0, (1000,))
    again = SecureRandom("r" * 64, "noise", 0, 0).normal(1.0, (1000,))
    other_round = SecureRandom("r" * 64, "noise", 1, 0).normal(1.0, (1000,))
    other_root = SecureRandom("s" * 64, "noise", 0, 0).normal(1.0, (1000,))
    assert torch.equal(a, again)
    for b in (other_round, other_root):
        assert abs(float(np.corrcoef(a.numpy(), b.numpy())[0, 1])) < 0.15  # 1000 pairs: 4.7 standard errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussians_are_normal_with_the_asked_std(dtype):
    draws = SecureRandom.fresh("test").normal(2.5, (200, 250), dtype=dtype)
    assert draws.dtype == dtype and draws.shape == (200, 250)
    values = draws.double().flatten().numpy()
    assert stats.kstest(values / 2.5, "norm").pvalue > 1e-3
    assert values.std() == pytest.approx(2.5, rel=0.01)


# ----- a checkpoint never re-uses its noise on other data -------------------------------------------------------
def _killed_after_one_round(path, dataset):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    trainer = FederatedDPTrainer(
        model=toy_model(),
        args=toy_args(path, num_rounds=3, noise_seed=None),
        train_dataset=dataset,
        callbacks=[Kill()],
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()


def test_resume_on_edited_data_is_refused_and_on_the_same_data_accepted(tmp_path):
    # Prepare: a private run killed after round 1, and the same dataset with one example's label flipped
    data = toy_dataset()
    _killed_after_one_round(tmp_path / "run", data)
    edited = data.map(lambda row, i: {"labels": 1 - row["labels"] if i == 17 else row["labels"]}, with_indices=True)
    # Execute / Assert: on edited data the resume is refused, naming the client whose data changed
    refused = FederatedDPTrainer(
        model=toy_model(), args=toy_args(tmp_path / "run", num_rounds=3, noise_seed=None), train_dataset=edited
    )
    with pytest.raises(CheckpointMismatchError, match=r"data of client\(s\) \[\d\] differ"):
        refused.train(resume_from_checkpoint=True)
    # ... and on the same data it continues
    resumed = FederatedDPTrainer(
        model=toy_model(), args=toy_args(tmp_path / "run", num_rounds=3, noise_seed=None), train_dataset=data
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
