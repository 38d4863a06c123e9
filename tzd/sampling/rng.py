"""Counter-based random numbers: a pure function of (seed, step, position, token).

Each request's draws depend only on its own seed and coordinates, never on which other requests
share its batch or on the device, so results are batch-invariant and reproducible without one
torch.Generator per request (which would need a Python loop per step).
"""

from __future__ import annotations

import torch

_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_M1 = 0xBF58476D1CE4E5B9 - 2**64
_M2 = 0x94D049BB133111EB - 2**64

STREAM_GUMBEL = 1
STREAM_REMASK = 2


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def keys(seed: torch.Tensor, step: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """Per-(row, position) keys [B,P] from seed [B], step [B] and positions [B,P]."""
    h = mix(seed * 4 + stream)
    h = mix(h + step)
    return mix(h[:, None] + positions)


def uniform(key: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in the open interval (0, 1) from int64 keys: the top 53 bits, centred."""
    return (_shr(mix(key), 11).double() + 0.5) * 2.0**-53


def gumbel(key: torch.Tensor, vocab: int, first_token: int = 0) -> torch.Tensor:
    """Gumbel(0,1) noise [B,P,vocab] in float64 for keys [B,P], for tokens first_token .. first_token+vocab-1."""
    tok = torch.arange(first_token, first_token + vocab, device=key.device, dtype=torch.int64)
    u = uniform(mix(key[..., None] + tok))
    return -torch.log(-torch.log(u))
