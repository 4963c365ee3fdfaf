"""ExplainSteer: how much of a layer's kernels lies on each DCT-II basis vector (docs/method.md §5)."""

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from explainfix_cli.dct import dct2_basis, frequency_order
from explainfix_cli.numbers import finite

LOW_FREQUENCY_DEFINITION = (
    "share of the layer's e_d on the three lowest-frequency DCT-II basis vectors, (0,0) constant, "
    "(0,1) horizontal and (1,0) vertical, i.e. anti-diagonals 0 and 1; a layer without frequency "
    "preference scores about 3/(kh*kw), 0.33 for 3x3 kernels"
)


@dataclass(frozen=True)
class LayerSpectra:
    """The ExplainSteer spectra of one spatial convolution.

    `e_d` is in low-to-high frequency order (`frequency_order`); `e_1` is the vertical
    frequencies `0..kh-1` followed by the horizontal ones `0..kw-1`; `e_0` (square kernels only)
    adds the two. `low_frequency_share` is defined by `LOW_FREQUENCY_DEFINITION`; it is NaN for a
    layer without energy (all kernels zero), written as null (numbers.finite).
    """

    name: str
    kernel_shape: tuple[int, int]
    e_d: list[float]
    e_1: list[float]
    e_0: list[float] | None
    low_frequency_share: float
    saliency_weighted: bool

    @property
    def share_defined(self) -> bool:
        """Whether the layer has energy, so that its low-frequency share means something."""
        return finite(self.low_frequency_share) is not None

    def share_words(self, digits: int = 2) -> str:
        """The low-frequency share rounded for a person, or why there is none."""
        return f"{self.low_frequency_share:.{digits}f}" if self.share_defined else "undefined (all kernels zero)"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kernel_shape": list(self.kernel_shape),
            "e_d": self.e_d,
            "e_1": self.e_1,
            "e_0": self.e_0,
            "low_frequency_share": finite(self.low_frequency_share),
            "saliency_weighted": self.saliency_weighted,
        }


def explainsteer_spectra(weight: Tensor, kernel_weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """`(e_d, e_1, e_0)` of a spatial conv weight (docs/method.md §5, Gaudio et al. 2022).

    `weight` is `(O, I/groups, kh, kw)`; `kernel_weights` is the `(O, I/groups)` saliency
    `w_k` of each kernel, or None for the plain average `w_k = 1/N`. `e_d` comes back in
    low-to-high frequency order; `e_0` is None for non-square kernels.
    """
    out_ch, in_ch, kh, kw = weight.shape
    # float32 keeps the (N, kh*kw) products cheap on big layers (a float64 skinny matmul is ~10x
    # slower); torch's cascaded sum then keeps the total within ~1e-7 of a float64 computation.
    kernels = weight.detach().to("cpu", torch.float32).reshape(out_ch * in_ch, kh * kw)  # (N, kh*kw)
    if kernel_weights is None:
        w = torch.full((out_ch * in_ch, 1), 1 / (out_ch * in_ch))  # (N, 1)
    else:
        w = kernel_weights.detach().to("cpu", torch.float32).reshape(-1, 1)  # (N, 1)
    coefficients = (kernels @ dct2_basis(kh, kw, torch.float32).T).abs()  # (N, kh*kw) row-major (a, b)
    e_d = (w * coefficients).sum(dim=0).double()  # (kh*kw,)
    root = e_d.sqrt().reshape(kh, kw)  # (kh, kw) indexed by (vertical a, horizontal b)
    rows, cols = root.sum(dim=1), root.sum(dim=0)  # (kh,), (kw,)
    e_1 = torch.cat([rows, cols])  # (kh + kw,)
    e_0 = rows + cols if kh == kw else None  # (kh,)
    return e_d[frequency_order(kh, kw)], e_1, e_0


def low_frequency_share(e_d: Tensor) -> float:
    """Share of `e_d` (low-to-high order) on anti-diagonals 0 and 1: `LOW_FREQUENCY_DEFINITION`.

    NaN where the layer has no energy at all (every kernel zero, e.g. a layer a prune emptied):
    a share of nothing is undefined, not 0, and is reported as null (numbers.finite).
    """
    total = float(e_d.sum())
    # The diagonal order puts (0,0), (0,1), (1,0) first for every kernel of at least 2x2.
    return float(e_d[:3].sum()) / total if total > 0 else math.nan


def layer_spectra(name: str, weight: Tensor, kernel_weights: Tensor | None = None) -> LayerSpectra:
    """`explainsteer_spectra` of one named layer, packed for reports."""
    e_d, e_1, e_0 = explainsteer_spectra(weight, kernel_weights)
    return LayerSpectra(
        name=name,
        kernel_shape=(weight.shape[2], weight.shape[3]),
        e_d=e_d.tolist(),
        e_1=e_1.tolist(),
        e_0=None if e_0 is None else e_0.tolist(),
        low_frequency_share=low_frequency_share(e_d),
        saliency_weighted=kernel_weights is not None,
    )
