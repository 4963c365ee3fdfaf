"""docs/method.md §4: fixing spatial filters and steered initialisation (DCT2, GHaar, Kaiming), and `fix`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import SAMPLES
from torch import nn
from typer.testing import CliRunner

from explainfix_cli.cli.app import app
from explainfix_cli.dct import dct2_basis
from explainfix_cli.io.checkpoints import load_model
from explainfix_cli.models import spatial_convs
from explainfix_cli.training.fixed import dct2_kernels, fix, ghaar_kernel, ghaar_kernels, kaiming_kernels

RESNET = ["--arch", "explainfix_cli.zoo:resnet", "--arch-kwargs", '{"num_classes": 10, "in_channels": 1}']


def _basis_index(kernels: torch.Tensor) -> torch.Tensor:
    """(O, I) index of the DCT-II basis vector each kernel equals; fails if one is not a basis vector."""
    o, i, kh, kw = kernels.shape
    coeffs = kernels.reshape(o, i, kh * kw).double() @ dct2_basis(kh, kw).T  # (O, I, K) DCT coefficients
    index = coeffs.abs().argmax(dim=2)
    one_hot = torch.nn.functional.one_hot(index, kh * kw).double()
    torch.testing.assert_close(coeffs, one_hot, atol=1e-6, rtol=0)  # exactly one coefficient, equal to 1
    return index


def test_dct2_init_uses_every_basis_vector_per_output_channel_cycling_a_permutation() -> None:
    w = dct2_kernels(torch.Size([5, 20, 3, 3]), torch.Generator().manual_seed(1))  # (5, 20, 3, 3)
    index = _basis_index(w)
    for o in range(5):
        assert sorted(index[o, :9].tolist()) == list(range(9))  # the first 9 kernels: a permutation
        assert torch.equal(index[o, 9:18], index[o, :9])  # then the same permutation again
        assert torch.equal(index[o, 18:], index[o, :2])
    assert len({tuple(index[o, :9].tolist()) for o in range(5)}) > 1  # a permutation per output channel


def test_dct2_init_of_depthwise_layer_still_uses_every_basis_vector() -> None:
    w = dct2_kernels(torch.Size([25, 1, 5, 5]), torch.Generator().manual_seed(2))  # depthwise 5x5
    assert sorted(_basis_index(w).flatten().tolist()) == list(range(25))


def test_ghaar_matches_a_hand_computed_kernel() -> None:
    # f = 1 on a 3-tap kernel: x = (0, π/2, π), c = cos(x) = (1, 0, -1); K[i, j] = h c_i + v c_j + d c_i c_j
    kernel = ghaar_kernel(torch.tensor(0.5), torch.tensor(-0.25), torch.tensor(1.0), torch.tensor(1.0), 3, 3)
    expected = torch.tensor([[1.25, 0.5, -0.25], [-0.25, 0.0, 0.25], [-1.75, -0.5, 0.75]])
    torch.testing.assert_close(kernel, expected, atol=1e-6, rtol=0)


def test_ghaar_init_draws_h_v_d_then_f_per_kernel() -> None:
    w = ghaar_kernels(torch.Size([4, 3, 3, 3]), torch.Generator().manual_seed(3))  # (4, 3, 3, 3)
    g = torch.Generator().manual_seed(3)
    h, v, d, f = (torch.rand(4, 3, generator=g) for _ in range(4))
    h, v, d, f = 2 * h - 1, 2 * v - 1, 2 * d - 1, 4 * f  # U(-1, 1) and U(0, 2(k-1)) for k = 3
    o, i = 2, 1
    c = [math.cos(float(f[o, i]) * x) for x in (0, math.pi / 2, math.pi)]
    by_hand = [[float(h[o, i]) * c[r] + float(v[o, i]) * c[s] + float(d[o, i]) * c[r] * c[s] for s in range(3)] for r in range(3)]
    torch.testing.assert_close(w[o, i], torch.tensor(by_hand), atol=1e-5, rtol=0)


def test_random_init_is_kaiming_normal() -> None:
    w = kaiming_kernels(torch.Size([64, 64, 3, 3]), torch.Generator().manual_seed(4))
    assert abs(float(w.std()) / math.sqrt(2 / (64 * 9)) - 1) < 0.02
    assert abs(float(w.mean())) < 0.002


def test_fix_leaves_only_non_spatial_parameters_trainable(tmp_path: Path) -> None:
    out = tmp_path / "fixed.safetensors"
    result = CliRunner().invoke(app, ["fix", *RESNET, "--input-size", "1,16,16", "--init", "ghaar", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    model = load_model(out)
    spatial = {f"{name}.{p}" for name, conv in spatial_convs(model) for p, _ in conv.named_parameters(recurse=False)}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == spatial
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["trainable_params"] == trainable == report["params"] - sum(m.weight.numel() for _, m in spatial_convs(model))
    assert report["reinitialised_kernels"] == report["spatial_kernels"] == 8208
    # the written filters are GHaar ones: every 3x3 kernel is a steering of cos(f x) filters, so its
    # rank is at most 2 (span of outer(c, 1), outer(1, c), outer(c, c) = c ⊗ (h1 + d c) + 1 ⊗ v c)
    conv = spatial_convs(model)[1][1]
    singular = torch.linalg.svdvals(conv.weight.detach())  # (O, I, 3)
    assert float((singular[..., 2] / singular[..., 0]).max()) < 1e-5


def test_fix_keep_fixes_a_trained_model_without_changing_it(tmp_path: Path) -> None:
    source = tmp_path / "kept.safetensors"
    shutil.copy(SAMPLES / "resnet.safetensors", source)
    result = CliRunner().invoke(app, ["fix", str(source)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "kept-fixed.safetensors"  # the default output, beside the input
    original, fixed = load_model(SAMPLES / "resnet.safetensors"), load_model(out)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(original(x), fixed(x))
    assert all(not conv.weight.requires_grad for _, conv in spatial_convs(fixed))


def test_same_seed_same_bytes_and_another_seed_other_filters(tmp_path: Path) -> None:
    paths = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        paths.append(tmp_path / f"{name}.safetensors")
        args = ["fix", *RESNET, "--init", "dct2", "--seed", seed, "--out", str(paths[-1])]
        assert CliRunner().invoke(app, args).exit_code == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_fix_library_does_not_touch_the_global_rng() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    state = torch.get_rng_state()
    fix(model, "dct2", seed=5)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--init", "dct2"], "give a MODEL"),
        ([*RESNET, "--input-size", "3,16,16"], "do not fit the model"),
        (["--arch", "explainfix_cli.zoo:nothing"], "has no attribute"),
    ],
)
def test_fix_bad_input_is_one_sentence_and_exit_2(tmp_path: Path, args: list[str], words: str) -> None:
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(app, ["fix", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert words in result.stderr and "Traceback" not in result.output
    assert not out.exists()
