"""The randomness of the DP mechanism: a cryptographically secure stream keyed by a secret root.

torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so a noise stream seeded from any secret is
one of 2^32 and a brute force over them recovers it from a published adapter (measured: ~16 CPU-minutes, then
the noise-free update to 1.5e-8); CUDA's Philox keeps 64 bits. Neither may produce the DP noise or the Poisson
batches. `SecureRandom` is a ChaCha20 keystream (the `cryptography` package, i.e. OpenSSL) under a 256-bit key
derived by HKDF-SHA256 from the private root and a label (purpose, round, client, ...): nothing short of the
root re-creates a stream, and two labels give independent streams.

Uniforms: the top 53 bits of each 64-bit word, offset by half a unit, so u lies in (0, 1) on a grid of 2^-53.
Gaussians: Box-Muller in float64, and, as opacus' `secure_mode` does (Holohan and Braghin 2021, section 5.1:
the floating-point attacks of arXiv 2107.10138 and 2112.05307 invert or fingerprint a single sample), each
Gaussian released in float64 is the sum of 4 independent ones divided by 2 (the same variance): the cipher closes
the attack that re-creates the generator's state, the sum the attacks that read the lattice of one float sample.
A float32 release takes one draw: 53-bit draws leave no hole at float32's 24-bit resolution.
Measured cost: benchmarks/dp_overhead.py.

Device: the keystream is always made on the CPU (no GPU cipher), moved as float64 uniforms and turned into
Gaussians on the device: 32 bytes moved per noise coordinate, the Gaussian arithmetic on the device.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError

__all__ = ["SecureRandom", "derive_key", "GAUSSIANS_SUMMED", "GENERATOR"]

GENERATOR = "ChaCha20, key HKDF-SHA256(private root, purpose, round, client); Box-Muller in float64"  # reports
GAUSSIANS_SUMMED = 4  # opacus' secure_mode: 2n Gaussians with n = 2, summed and divided by sqrt(2n)
_UNIT = 2.0**-53
_NONCE = bytes(16)  # each key drives one stream, so a fixed nonce never repeats a (key, nonce) pair
_NO_FLOAT64 = ("mps",)  # devices without float64: the Gaussians are made on the CPU and moved


def _root_bytes(root) -> bytes:
    if isinstance(root, bytes) and len(root) >= 16:
        return root
    if isinstance(root, str) and root:
        return root.encode()
    if isinstance(root, int) and not isinstance(root, bool):  # a fixed `noise_seed`, or a non-private run's seed
        return f"int:{root}".encode()
    raise ConfigError(
        f"The private root of the randomness must be a secret string (e.g. `secrets.token_hex(32)`), bytes of at "
        f"least 16, or an int (a fixed `noise_seed`, no guarantee), got {type(root).__name__}."
    )


def derive_key(root, *labels) -> bytes:
    """A 256-bit key from the private `root` and `labels` (HKDF-SHA256; the labels are its `info`)."""
    info = "peft_lalora/v1/" + "/".join(str(label) for label in labels)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(_root_bytes(root))


class SecureRandom:
    """A ChaCha20 keystream keyed by `derive_key(root, *labels)` (`root`: `secrets.token_hex(32)` for a DP run, an
    int only for a fixed seed; `labels`: what it is for, e.g. ("noise", round, client)), read in order. Deterministic
    given (root, labels) and the order of the draws: a resumed run re-creates them from its private checkpoint."""

    def __init__(self, root, *labels):
        self._stream = Cipher(algorithms.ChaCha20(derive_key(root, *labels), _NONCE), mode=None).encryptor()
        self.labels = tuple(labels)

    @classmethod
    def fresh(cls, *labels) -> SecureRandom:
        """A stream under a root drawn from the operating system's entropy now (used once, never stored)."""
        return cls(os.urandom(32), *labels)

    def words(self, count: int) -> np.ndarray:
        """The next `count` 64-bit words of the keystream."""
        return np.frombuffer(self._stream.update(bytes(8 * count)), dtype=np.uint64)

    def uniform(self, count: int, device=None) -> torch.Tensor:
        """`count` float64 uniforms in (0, 1) on `device`: (top 53 bits of a word + 1/2) * 2^-53."""
        values = ((self.words(count) >> np.uint64(11)).astype(np.float64) + 0.5) * _UNIT
        return torch.from_numpy(values).to(device or "cpu")

    def standard_normal(self, count: int, device=None, summed: int = 1) -> torch.Tensor:
        """`count` float64 N(0, 1) draws by Box-Muller; with `summed` = n, each is the sum of n draws / sqrt(n)."""
        pairs = (count * summed + 1) // 2
        u = self.uniform(2 * pairs, device)
        radius = torch.sqrt(torch.log(u[:pairs]).mul_(-2.0))
        angle = u[pairs:].mul_(2.0 * torch.pi)
        z = torch.cat([radius * torch.cos(angle), radius.mul_(torch.sin(angle))])[: count * summed]
        return z if summed == 1 else z.view(summed, count).sum(dim=0).div_(summed**0.5)

    def normal(self, std: float, shape, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """N(0, std^2) of `shape`, drawn in float64 and rounded once to `dtype`, float32 (one draw) or float64
        (`GAUSSIANS_SUMMED` draws: module docstring)."""
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"DP noise is released in float32 or float64, got `dtype`={dtype}.")
        shape = tuple(shape)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        summed = GAUSSIANS_SUMMED if dtype == torch.float64 else 1
        where = device if device is not None and torch.device(device).type not in _NO_FLOAT64 else "cpu"
        return self.standard_normal(count, where, summed).mul_(std).view(shape).to(device or "cpu", dtype)

    def bernoulli(self, count: int, probability: float) -> torch.Tensor:
        """`count` independent inclusions, each True with `probability` (u < p; p = 1 includes all)."""
        return self.uniform(count) < probability
