"""The DCT-II basis (docs/method.md §4) and the low-to-high frequency order (docs/method.md §5)."""

from __future__ import annotations

import math

import pytest
import torch

from explainfix_cli.dct import dct1_basis, dct2_basis, frequency_order


@pytest.mark.parametrize("shape", [(2, 2), (3, 3), (5, 5), (3, 5), (5, 3), (7, 7)])
def test_basis_is_orthonormal(shape: tuple[int, int]) -> None:
    basis = dct2_basis(*shape)
    n = shape[0] * shape[1]
    assert basis.shape == (n, n)
    torch.testing.assert_close(basis @ basis.T, torch.eye(n, dtype=basis.dtype))


def test_2x2_basis_by_hand() -> None:
    # c_0 = [1, 1] / sqrt(2), c_1 = [cos(pi/4), cos(3pi/4)] = [1, -1] / sqrt(2): outer products are ±1/2.
    expected = 0.5 * torch.tensor(
        [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64
    )  # rows (0,0) constant, (0,1) left-right, (1,0) top-bottom, (1,1) checkerboard
    torch.testing.assert_close(dct2_basis(2, 2), expected)


def test_1d_basis_by_hand() -> None:
    s = math.sqrt(2 / 3)
    expected = torch.tensor(
        [[1 / math.sqrt(3)] * 3, [s * math.cos(math.pi / 6), 0.0, -s * math.cos(math.pi / 6)], [s / 2, -s, s / 2]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(dct1_basis(3), expected)


def test_rows_are_row_major_outer_products_for_non_square_kernels() -> None:
    rows, cols = dct1_basis(3), dct1_basis(5)
    basis = dct2_basis(3, 5)
    for a in range(3):
        for b in range(5):
            torch.testing.assert_close(basis[a * 5 + b], torch.outer(rows[a], cols[b]).reshape(-1))
    # (0, 1): constant down each column, one half-cosine across: horizontal frequency 1.
    assert torch.allclose(basis[1].reshape(3, 5), basis[1].reshape(3, 5)[0].expand(3, 5))


def test_3x3_order() -> None:
    assert frequency_order(3, 3) == [0, 1, 3, 2, 6, 4, 5, 7, 8]


def test_5x5_order() -> None:
    expected = "0 1 5 2 10 6 3 15 7 11 4 20 8 16 12 9 21 13 17 14 22 18 19 23 24"
    assert frequency_order(5, 5) == [int(v) for v in expected.split()]


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (2, 7), (4, 4)])
def test_order_is_a_permutation_by_increasing_anti_diagonal(shape: tuple[int, int]) -> None:
    kh, kw = shape
    order = frequency_order(kh, kw)
    assert sorted(order) == list(range(kh * kw))
    diagonals = [j // kw + j % kw for j in order]
    assert diagonals == sorted(diagonals)
    assert order[:3] == [0, 1, kw]  # constant, then horizontal and vertical frequency 1


def test_3x5_order_takes_each_anti_diagonal_from_its_ends_inwards() -> None:
    # a+b=2: (0,2) (2,0) ends, (1,1) centre; a+b=3: (0,3) (2,1) ends, (1,2) centre; ...
    assert frequency_order(3, 5) == [0, 1, 5, 2, 10, 6, 3, 11, 7, 4, 12, 8, 9, 13, 14]
