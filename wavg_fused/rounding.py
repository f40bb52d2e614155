"""Stochastic rounding to bfloat16 in plain PyTorch, bit for bit what the kernels do
(``csrc/wavg_rule.h``): Philox4x32-10 keyed by the seed, counting (element // 4, update count);
the element takes output word ``element % 4``, whose low 16 bits are added to the float32 bits
before truncation. Used by the ``torch`` backend, and by the tests as the kernels' reference.
"""

from __future__ import annotations

import torch

__all__ = ["philox4x32_10", "stochastic_round_bf16"]

_MASK32 = 0xFFFFFFFF
_MUL = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The 64-bit product of two 32-bit numbers, computed in 16-bit halves so that no int64
    # intermediate overflows.
    high, low = constant >> 16, constant & 0xFFFF
    partial = low * x  # < 2**48
    upper = high * x + (partial >> 16)  # < 2**49
    return upper >> 16, ((upper & 0xFFFF) << 16) | (partial & 0xFFFF)


def philox4x32_10(counter: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding 32-bit words (matches Random123's known answers).

    >>> [int(w) for w in philox4x32_10([torch.tensor(0)] * 4, (0, 0))]
    [1713891541, 3781805453, 3159862348, 2600524760]
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_MUL[0], c0)
        hi1, lo1 = _mulhilo(_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _WEYL[0]) & _MASK32, (k1 + _WEYL[1]) & _MASK32
    return [c0, c1, c2, c3]


def stochastic_round_bf16(values: torch.Tensor, seed: int, n_averaged: torch.Tensor, first: int) -> torch.Tensor:
    """Round float32 ``values`` (elements ``first, first + 1, ...`` of their storage buffer) to
    bfloat16 at random, unbiased: ``E[result] == values``. ``n_averaged`` stays on its device.

    >>> x = torch.full((10000,), 1.0 + 2**-10)
    >>> r = stochastic_round_bf16(x, seed=0, n_averaged=torch.tensor(5), first=0).float()
    >>> sorted(set(r.tolist())), abs(r.mean().item() - x[0].item()) < 2e-4
    ([1.0, 1.0078125], True)
    """
    elements = torch.arange(first, first + values.numel(), dtype=torch.int64, device=values.device)
    group = elements >> 2
    n = n_averaged.to(device=values.device, dtype=torch.int64)
    words = philox4x32_10(
        [group & _MASK32, group >> 32, (n & _MASK32).expand_as(group), (n >> 32).expand_as(group)],
        (seed & _MASK32, (seed >> 32) & _MASK32),
    )
    lane = (elements & 3).unsqueeze(0)
    random = torch.stack(words).gather(0, lane).squeeze(0)
    bits = values.reshape(-1).contiguous().view(torch.int32).to(torch.int64) & _MASK32
    finite = (bits & 0x7F800000) != 0x7F800000
    bits = torch.where(finite, bits + (random & 0xFFFF), bits) >> 16
    bits = torch.where(bits >= 1 << 15, bits - (1 << 16), bits)  # as a signed 16-bit word
    return bits.to(torch.int16).view(torch.bfloat16).reshape(values.shape)
