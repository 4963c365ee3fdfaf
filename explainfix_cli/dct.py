"""The orthonormal 2-D DCT-II basis of a spatial kernel and its low-to-high frequency order.

Shared by explain (docs/method.md §5, ExplainSteer) and by steered initialisation (docs/method.md §4).
"""

import math

import torch
from torch import Tensor


def dct1_basis(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """1-D orthonormal DCT-II basis: row k is c_k(i) = a_k cos(pi/n (i + 1/2) k) (docs/method.md §4)."""
    k = torch.arange(n, dtype=dtype).unsqueeze(1)  # (n, 1) frequency
    i = torch.arange(n, dtype=dtype).unsqueeze(0)  # (1, n) position
    scale = torch.full((n, 1), math.sqrt(2 / n), dtype=dtype)  # (n, 1)
    scale[0] = math.sqrt(1 / n)
    return scale * torch.cos(math.pi / n * (i + 0.5) * k)  # (n, n)


def dct2_basis(kh: int, kw: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """2-D orthonormal DCT-II basis of a `(kh, kw)` kernel (docs/method.md §4).

    Row `j = a * kw + b` is the outer product of the 1-D vectors `c_a` (vertical frequency `a`)
    and `c_b` (horizontal frequency `b`), flattened row-major like `kernel.reshape(-1)`, so
    `kernel.reshape(-1) @ B.T` gives the kernel's DCT-II coefficients.
    """
    # The Kronecker product of the two 1-D bases is exactly the row-major outer-product basis.
    return torch.kron(dct1_basis(kh, dtype), dct1_basis(kw, dtype))  # (kh*kw, kh*kw)


def frequency_order(kh: int, kw: int) -> list[int]:
    """Row-major basis indices ordered from low to high frequency (docs/method.md §5).

    Anti-diagonals `a + b = s` by increasing `s`; within one, its cells are taken from the two
    ends inwards (the end with the smaller `a` first), the centre last. For non-square kernels an
    anti-diagonal holds only the cells inside the `(kh, kw)` grid, and the same rule applies.
    """
    order: list[int] = []
    for s in range(kh + kw - 1):
        cells = [a * kw + (s - a) for a in range(max(0, s - kw + 1), min(s, kh - 1) + 1)]
        lo, hi = 0, len(cells) - 1
        while lo < hi:
            order += [cells[lo], cells[hi]]
            lo, hi = lo + 1, hi - 1
        if lo == hi:
            order.append(cells[lo])
    return order
