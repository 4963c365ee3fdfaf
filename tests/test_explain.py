"""ExplainSteer spectra (docs/method.md §5) against hand computations, and the explain report end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLASSIFIERS, DATA_OF, SAMPLES, committed_sample, sample_data, sample_model
from PIL import Image
from torch import nn

from explainfix_cli.dct import dct2_basis, frequency_order
from explainfix_cli.errors import UserError
from explainfix_cli.explanation import explain, explainsteer_spectra, layer_spectra
from explainfix_cli.io.data import Dataset

ORDER_3X3 = [0, 1, 3, 2, 6, 4, 5, 7, 8]
LAYER_FIELDS = {"name", "kernel_shape", "e_d", "e_1", "e_0", "low_frequency_share", "saliency_weighted"}


def dct_coefficient(kernel: list[list[float]], a: int, b: int) -> float:
    """One 2-D DCT-II coefficient straight from the cosine formula, no matrices."""
    kh, kw = len(kernel), len(kernel[0])

    def c(k: int, n: int, size: int) -> float:
        return math.sqrt((1 if k == 0 else 2) / size) * math.cos(math.pi / size * (n + 0.5) * k)

    return sum(kernel[m][n] * c(a, m, kh) * c(b, n, kw) for m in range(kh) for n in range(kw))


def spectra_by_loop(weight: torch.Tensor, kernel_weights: torch.Tensor | None) -> tuple[list, list, list | None]:
    """docs/method.md §5 one kernel and one basis vector at a time, as plain Python."""
    out_ch, in_ch, kh, kw = weight.shape
    e_d = [0.0] * (kh * kw)
    for o in range(out_ch):
        for i in range(in_ch):
            w_k = 1 / (out_ch * in_ch) if kernel_weights is None else float(kernel_weights[o, i])
            kernel = weight[o, i].tolist()
            for a in range(kh):
                for b in range(kw):
                    e_d[a * kw + b] += w_k * abs(dct_coefficient(kernel, a, b))
    rows, cols = [0.0] * kh, [0.0] * kw
    for j, energy in enumerate(e_d):
        rows[j // kw] += energy**0.5
        cols[j % kw] += energy**0.5
    e_0 = [r + c for r, c in zip(rows, cols, strict=True)] if kh == kw else None
    return [e_d[j] for j in frequency_order(kh, kw)], rows + cols, e_0


def test_kernels_that_are_basis_vectors_give_their_own_energy() -> None:
    # Kernel o is (o + 1) times basis vector o: its only coefficient is o + 1, at basis index o.
    basis = dct2_basis(3, 3).float()
    weight = (torch.arange(1.0, 10.0)[:, None] * basis).reshape(9, 1, 3, 3)  # (O=9, I=1, 3, 3)
    e_d, e_1, e_0 = explainsteer_spectra(weight)
    row_major = torch.arange(1.0, 10.0, dtype=torch.float64) / 9  # w_k = 1/N
    torch.testing.assert_close(e_d, row_major[ORDER_3X3], rtol=1e-6, atol=1e-6)
    root = row_major.sqrt().reshape(3, 3)
    torch.testing.assert_close(e_1, torch.cat([root.sum(1), root.sum(0)]), rtol=1e-6, atol=1e-6)
    assert e_0 is not None
    torch.testing.assert_close(e_0, root.sum(1) + root.sum(0), rtol=1e-6, atol=1e-6)


def test_saliency_weights_scale_each_kernel() -> None:
    basis = dct2_basis(3, 3).float()
    weight = basis.reshape(9, 1, 3, 3)  # kernel o is basis vector o
    kernel_weights = torch.arange(9.0).reshape(9, 1)  # (O, I/groups)
    e_d, _, _ = explainsteer_spectra(weight, kernel_weights)
    torch.testing.assert_close(e_d, torch.arange(9.0, dtype=torch.float64)[ORDER_3X3], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (4, 2, 5, 5), (3, 2, 3, 5)])
@pytest.mark.parametrize("weighted", [False, True])
def test_random_layer_matches_plain_loop(shape: tuple[int, int, int, int], weighted: bool) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(shape, generator=generator)
    kernel_weights = torch.rand(shape[:2], generator=generator) if weighted else None
    e_d, e_1, e_0 = explainsteer_spectra(weight, kernel_weights)
    expected_d, expected_1, expected_0 = spectra_by_loop(weight, kernel_weights)
    torch.testing.assert_close(e_d, torch.tensor(expected_d, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e_1, torch.tensor(expected_1, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    if expected_0 is None:
        assert e_0 is None
    else:
        torch.testing.assert_close(e_0, torch.tensor(expected_0, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_non_square_kernel_has_no_e_0_but_full_e_1() -> None:
    spectra = layer_spectra("conv", torch.randn(4, 2, 3, 5))
    assert spectra.e_0 is None
    assert len(spectra.e_1) == 3 + 5
    assert len(spectra.e_d) == 15
    assert spectra.to_json()["e_0"] is None


def test_grouped_and_depthwise_convs_use_their_own_kernels() -> None:
    depthwise = nn.Conv2d(8, 8, 3, groups=8)
    grouped = nn.Conv2d(8, 4, 3, groups=2)
    for conv in (depthwise, grouped):
        e_d, _, _ = explainsteer_spectra(conv.weight)
        expected, _, _ = spectra_by_loop(conv.weight.detach(), None)
        torch.testing.assert_close(e_d, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_low_frequency_share() -> None:
    constant = torch.ones(4, 3, 3, 3)  # all energy on the (0,0) basis vector
    assert layer_spectra("c", constant).low_frequency_share == pytest.approx(1.0)
    basis = dct2_basis(3, 3).float().reshape(9, 1, 3, 3)  # equal energy on every basis vector
    assert layer_spectra("b", basis).low_frequency_share == pytest.approx(3 / 9)
    zero = layer_spectra("z", torch.zeros(2, 2, 3, 3))  # a share of nothing: undefined, not 0
    assert math.isnan(zero.low_frequency_share) and zero.to_json()["low_frequency_share"] is None
    assert not zero.share_defined and zero.share_words() == "undefined (all kernels zero)"


# ---- the report -----------------------------------------------------------------------------------


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),
        nn.Conv2d(6, 8, 1),  # a channel mixer: not explained
        nn.ReLU(),
        nn.Conv2d(8, 8, (3, 5), padding=(1, 2)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()


def small_data() -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset(torch.randn(20, 1, 12, 12, generator=generator), torch.arange(20) % 3, batch_size=8)


def assert_images(folder: Path, names: list[str]) -> None:
    for name in names:
        with Image.open(folder / name) as image:
            image.verify()


def test_attribution_methods_against_hand_computations() -> None:
    from explainfix_cli.explanation.attributions import input_attributions

    model, data = small_model(), small_data()
    x, y = data.x[:3].clone().requires_grad_(True), data.y[:3]
    logit = model(x).gather(1, y[:, None]).sum()  # the labelled class's logit, summed over inputs
    (grad,) = torch.autograd.grad(logit, x)
    saliency = input_attributions(model, data, 3, "saliency")
    torch.testing.assert_close(saliency.attributions, grad.abs())
    # integrated gradients are complete: per input they add up to f(x) - f(0)
    ig = input_attributions(model, data, 3, "integrated-gradients")
    with torch.no_grad():
        gain = model(data.x[:3]).gather(1, y[:, None]).flatten() - model(torch.zeros_like(data.x[:3]))[:, y].diagonal()
    torch.testing.assert_close(ig.attributions.flatten(1).sum(dim=1), gain, rtol=0.05, atol=0.02)


def test_explain_writes_figures_spectra_and_index(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = explain(small_model(), small_data(), out, attributions=2)
    summary = result.to_json()

    names = [f.name for f in result.figures]
    assert set(names) == {
        "spectra_3x3.png", "profile_3x3.png", "dct_basis_3x3.png",
        "spectra_3x5.png", "profile_3x5.png", "dct_basis_3x5.png",
        "kernels.png", "kernel_saliency.png", "attributions.png",
    }  # fmt: skip
    assert_images(out, names)
    assert [layer["name"] for layer in summary["layers"]] == ["0", "2", "5"]
    assert all(set(layer) == LAYER_FIELDS and layer["saliency_weighted"] for layer in summary["layers"])
    assert summary["layers"][2]["e_0"] is None
    assert [f["path"] for f in summary["figures"]] == [str(out / n) for n in names]
    assert json.loads((out / "spectra.json").read_text()) == result.spectra_json()
    index = (out / "index.html").read_text()
    assert all(f'src="{name}"' in index for name in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folder left


def test_saliency_weighting_uses_the_gradient_weights(tmp_path: Path) -> None:
    from explainfix_cli.saliency import gradient_weights

    model, data = small_model(), small_data()
    result = explain(model, data, tmp_path / "r", attributions=0)
    weights = gradient_weights(model, data)
    e_d, _, _ = explainsteer_spectra(model[0].weight, weights["0"])
    assert result.layers[0].e_d == pytest.approx(e_d.tolist())


def test_without_data_spectra_are_unweighted_and_there_is_no_saliency_figure(tmp_path: Path) -> None:
    model = small_model()
    result = explain(model, None, tmp_path / "r", fmt="svg")
    assert not result.saliency_weighted
    assert {f.name for f in result.figures} >= {"spectra_3x3.svg", "kernels.svg"}
    assert not any(f.name.startswith(("kernel_saliency", "attributions")) for f in result.figures)
    e_d, _, _ = explainsteer_spectra(model[0].weight)
    assert result.layers[0].e_d == pytest.approx(e_d.tolist())


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_same_input_gives_identical_files(fmt: str, tmp_path: Path) -> None:
    first = explain(small_model(), small_data(), tmp_path / "a", fmt=fmt, attributions=1)
    explain(small_model(), small_data(), tmp_path / "b", fmt=fmt, attributions=1)
    for figure in first.figures:
        assert (tmp_path / "a" / figure.name).read_bytes() == (tmp_path / "b" / figure.name).read_bytes(), figure.name


def test_figures_drawn_in_parallel_equal_figures_drawn_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from explainfix_cli.figures import spectra as figures

    monkeypatch.setattr(figures.os, "cpu_count", lambda: 1)
    in_turn = explain(small_model(), small_data(), tmp_path / "a", attributions=2)
    monkeypatch.setattr(figures.os, "cpu_count", lambda: 4)  # forked workers (on Linux)
    explain(small_model(), small_data(), tmp_path / "b", attributions=2)
    assert len(in_turn.figures) == 9
    for figure in in_turn.figures:
        assert (tmp_path / "a" / figure.name).read_bytes() == (tmp_path / "b" / figure.name).read_bytes(), figure.name


def _failing_figure(path: Path) -> None:
    raise ValueError(f"cannot draw {path.name}")


def test_a_figure_that_fails_in_a_worker_fails_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from explainfix_cli.figures import spectra as figures

    monkeypatch.setattr(figures.os, "cpu_count", lambda: 4)
    jobs = [(Path.touch, tmp_path / "fine.txt"), (_failing_figure, tmp_path / "broken.png")]
    with pytest.raises(ValueError, match=r"cannot draw broken\.png"):
        figures.draw_all(jobs)
    assert (tmp_path / "fine.txt").exists() and not (tmp_path / "broken.png").exists()


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="`force`"):
        explain(small_model(), None, out)
    assert (out / "keep.txt").read_text() == "mine"
    explain(small_model(), None, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"  # --force replaces only what explain writes
    assert (out / "index.html").exists()


def test_bad_input_is_a_user_error_and_leaves_nothing(tmp_path: Path) -> None:
    no_spatial = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(UserError, match="no spatial convolutions"):
        explain(no_spatial, None, tmp_path / "a")
    wrong_channels = Dataset(torch.randn(4, 3, 12, 12), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match="do not fit"):
        explain(small_model(), wrong_channels, tmp_path / "b")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError):
        explain(small_model(), None, tmp_path / "file" / "report")
    with pytest.raises(UserError, match="format"):
        explain(small_model(), None, tmp_path / "c", fmt="jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---- the sample models ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*CLASSIFIERS, *DATA_OF])
def test_every_sample_model_is_explained(name: str, tmp_path: Path) -> None:
    loaded = sample_model(name)
    result = explain(loaded.model, sample_data(name, batch_size=32, batches=1), tmp_path / name, attributions=2)
    assert result.layers and all(layer.saliency_weighted for layer in result.layers)
    assert_images(tmp_path / name, [f.name for f in result.figures])


def test_trained_resnet_prefers_low_frequencies() -> None:
    """The paper's observation: summed over layers, energy falls from low to high frequency."""
    loaded = sample_model("resnet")
    e_d = torch.tensor([layer_spectra(n, m.weight).e_d for n, m in _spatial(loaded.model)]).sum(0)  # (9,)
    share = e_d / e_d.sum()
    assert share[:3].sum() > 3 / 9  # more than a layer without frequency preference
    assert share[0] > share[-1]


def _spatial(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    from explainfix_cli.models import spatial_convs

    return spatial_convs(model)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "explainfix_cli", "explain", *args], capture_output=True, text=True, check=False
    )


def test_cli_json(tmp_path: Path) -> None:
    committed_sample("resnet.safetensors")
    out = tmp_path / "report"
    done = run_cli(
        str(SAMPLES / "resnet.safetensors"), "--data", str(SAMPLES / "digits_val.npz"), "--out", str(out),
        "--batches", "1", "--attributions", "2", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert {"out", "layers", "figures", "saliency_weighted", "spectra", "index"} <= set(summary)
    assert all(set(layer) == LAYER_FIELDS for layer in summary["layers"])
    assert all(Path(f["path"]).is_file() for f in summary["figures"])


def test_cli_no_figures_writes_the_same_numbers_only(tmp_path: Path) -> None:
    committed_sample("resnet.safetensors")
    common = [str(SAMPLES / "resnet.safetensors"), "--data", str(SAMPLES / "digits_val.npz"), "--batches", "1", "--json"]
    full = run_cli(*common, "--out", str(tmp_path / "full"), "--attributions", "1")
    numbers = run_cli(*common, "--out", str(tmp_path / "numbers"), "--no-figures")
    assert full.returncode == 0 and numbers.returncode == 0, numbers.stderr
    assert json.loads(numbers.stdout)["figures"] == []
    assert sorted(p.name for p in (tmp_path / "numbers").iterdir()) == ["index.html", "spectra.json"]
    assert (tmp_path / "numbers" / "spectra.json").read_bytes() == (tmp_path / "full" / "spectra.json").read_bytes()
    assert "--no-figures" in (tmp_path / "numbers" / "index.html").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "nuclei_val.npz"], "shape"),  # segmentation masks for a classifier
        (["--data", "missing.npz"], "does not exist"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    committed_sample("resnet.safetensors")
    args = [str(SAMPLES / a) if a.endswith(".npz") else a for a in args]
    done = run_cli(str(SAMPLES / "resnet.safetensors"), "--out", str(tmp_path / "r"), *args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "r").exists()


# ---- attribution grid: captions, wrapping, the cap --------------------------------------------------
def test_attribution_captions_say_truth_prediction_and_right_or_wrong() -> None:
    from explainfix_cli.explanation.attributions import input_attributions

    model, data = small_model(), small_data()
    with torch.no_grad():
        predicted = model(data.x[:6]).argmax(dim=1)
    result = input_attributions(model, data, 6)
    for k, (caption, right) in enumerate(zip(result.captions, result.correct, strict=True)):
        truth, guess = int(data.y[k]), int(predicted[k])
        assert caption == f"true {truth}\npredicted {guess}\n{'right' if truth == guess else 'wrong'}"
        assert right is (truth == guess)
    assert set(result.correct) == {True, False}  # the untrained model gets some right, some wrong

    names = Dataset(data.x, torch.nn.functional.one_hot(data.y, 3).float(), classes=["cat", "dog", "owl"])
    with torch.no_grad():
        positive = model(data.x[:2]) > 0  # (2, 3) what a multi-label reading predicts
    multi = input_attributions(model, names, 2)
    for k in range(2):
        guessed = ", ".join(n for n, p in zip(["cat", "dog", "owl"], positive[k].tolist(), strict=True) if p) or "none"
        assert multi.captions[k].startswith(f"true {['cat', 'dog', 'owl'][int(data.y[k])]}\npredicted {guessed}\n")
        assert multi.correct[k] is (positive[k].nonzero().flatten().tolist() == [int(data.y[k])])


def test_attributions_wrap_and_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from explainfix_cli.explanation import attributions, report
    from explainfix_cli.figures import spectra as figures

    monkeypatch.setattr(figures, "ATTRIBUTION_COLUMNS", 2)
    sizes = {}
    for n in (2, 3):
        images = np.random.default_rng(n).random((n, 1, 6, 6))  # (n, C, H, W)
        figures.draw_attributions(images, images, ["true 1\npredicted 1\nright"] * n, [True] * n, "saliency", tmp_path / f"{n}.png")
        with Image.open(tmp_path / f"{n}.png") as image:
            sizes[n] = image.size
    assert sizes[3][0] == sizes[2][0] and sizes[3][1] > 1.8 * sizes[2][1]  # a second row, not a wider one
    monkeypatch.setattr(figures, "draw_all", lambda jobs, done=None: None)  # the notes, not the drawing
    result = explain(small_model(), small_data(), tmp_path / "many", attributions=1000)
    assert result.notes == ["attribution maps for the first 20 inputs, not 1000: the data holds only 20."]
    monkeypatch.setattr(report, "MAX_ATTRIBUTIONS", 3)
    result = explain(small_model(), small_data(), tmp_path / "cap", attributions=5)
    assert result.notes == ["attribution maps for the first 3 inputs, not 5: one figure shows at most 3."]
    assert attributions.MAX_ATTRIBUTIONS == 32


# ---- a report that explains itself ------------------------------------------------------------------
def test_kernel_saliency_marks_what_prune_would_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from explainfix_cli.explanation import report
    from explainfix_cli.figures import spectra as figures
    from explainfix_cli.saliency import spatial_saliency

    drawn: dict[str, tuple] = {}
    monkeypatch.setattr(figures, "draw_kernel_saliency", lambda *args: drawn.setdefault("args", args))
    monkeypatch.setattr(figures, "draw_all", lambda jobs, done=None: [draw(path) for draw, path in jobs if path.stem == "kernel_saliency"])
    model, data = small_model(), small_data()
    result = explain(model, data, tmp_path / "r", pct=40, attributions=0)
    names, scores, zeroed, pct, total = drawn["args"][:5]
    assert names == ["0", "2", "5"] and pct == 40
    expected = spatial_saliency(model, data)  # what prune ranks by (docs/method.md §1)
    flat_scores = np.concatenate([s.flatten() for s in scores])
    flat_zeroed = np.concatenate([z.flatten() for z in zeroed])
    assert np.allclose(flat_scores, np.concatenate([expected[n].numpy().flatten() for n in names]))
    assert total == (int(0.4 * len(flat_scores)), len(flat_scores)) and int(flat_zeroed.sum()) == total[0]
    assert flat_scores[flat_zeroed].max() <= flat_scores[~flat_zeroed].min()  # the least salient, over all layers
    assert result.pct == 40 and "would zero" in next(f.caption for f in result.figures if f.name == "kernel_saliency.png")
    assert report.MAX_SALIENCY_PANELS >= 3
    with pytest.raises(UserError, match="`pct`"):
        explain(model, data, tmp_path / "bad", pct=100)


def test_index_names_model_data_metric_and_history(tmp_path: Path) -> None:
    from explainfix_cli.explanation import ReportSource

    model, data = small_model(), small_data()
    with torch.no_grad():
        accuracy = float((model(data.x).argmax(dim=1) == data.y).float().mean())
    step = {"step": "prune", "pct": 80.0, "granularity": "kernel", "removal": "exact", "criterion": "gradient",
            "params_before": 77754, "params_after": 26660, "metric": "accuracy", "metric_before": 0.9944, "metric_after": 0.3472}  # fmt: skip
    source = ReportSource(model="models/small.safetensors", arch={"factory": "zoo:small", "kwargs": {"num_classes": 3}},
                          data="digits.npz", history=[step], preprocessing={"mean": [0.3054], "std": [0.319]})  # fmt: skip
    result = explain(model, data, tmp_path / "r", source=source, with_figures=False)
    assert result.metric == "accuracy" and result.metric_value == pytest.approx(accuracy)
    index = (tmp_path / "r" / "index.html").read_text()
    for text in ("small.safetensors uses", "models/small.safetensors", "zoo:small(num_classes=3)", "digits.npz, 20 samples",
                 f"accuracy on this data</th><td>{accuracy:.3f}", "mean 0.3054, std 0.319",
                 "prune at --pct 80.0 (kernel granularity, exact removal, gradient saliency): 77,754 → 26,660 parameters, "
                 "accuracy 0.994 → 0.347", "low-frequency share", "add up to 1", "e<sub>d</sub>"):  # fmt: skip
        assert text in index, text
    bare = explain(model, None, tmp_path / "bare", with_figures=False)
    assert bare.metric is None and "none recorded" in (tmp_path / "bare" / "index.html").read_text()


def test_cli_report_of_an_image_folder_names_its_sources(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from explainfix_cli.cli.app import app

    model, folder = SAMPLES / "resnet.safetensors", SAMPLES / "digits_images"
    committed_sample("resnet.safetensors"), committed_sample("digits_images")
    done = CliRunner().invoke(app, ["explain", str(model), "--data", str(folder), "--out", str(tmp_path / "r"), "--no-figures", "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["metric"] == "accuracy" and summary["metric_value"] == pytest.approx(0.99)  # normalised the model's way
    index = (tmp_path / "r" / "index.html").read_text()
    assert all(text in index for text in (str(model), f"{folder}, 100 samples", "mean 0.3054, std 0.319", "none recorded"))


def test_cli_says_when_attributions_were_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from explainfix_cli.cli.app import app
    from explainfix_cli.figures import spectra as figures

    committed_sample("resnet.safetensors")
    monkeypatch.setattr(figures, "draw_all", lambda jobs, done=None: None)  # the message, not the drawing
    args = ["explain", str(SAMPLES / "resnet.safetensors"), "--data", str(SAMPLES / "digits_val.npz"), "--batches", "1"]
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r"), "--attributions", "1000", "--json"])
    assert done.exit_code == 0, done.output
    assert "note: attribution maps for the first 32 inputs, not 1000: one figure shows at most 32." in done.stderr
    assert json.loads(done.stdout)["notes"] == ["attribution maps for the first 32 inputs, not 1000: one figure shows at most 32."]


# ---- undefined numbers, legends and a pruned model's saliency figure ---------------------------------
def _captured_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Each figure the report draws, by file stem, as the matplotlib Figure (drawn in turn, in this process)."""
    from explainfix_cli.figures import spectra as figures

    drawn: dict[str, object] = {}
    save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: (drawn.setdefault(Path(path).stem, fig), save(fig, path)))
    monkeypatch.setattr(figures, "draw_all", lambda jobs, done=None: [draw(path) for draw, path in jobs])
    return drawn


def _texts(fig: object) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text)]  # type: ignore[attr-defined]


def test_an_all_zero_layer_has_an_undefined_share_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = _captured_figures(monkeypatch)
    model = small_model()
    with torch.no_grad():
        model[2].weight.zero_()  # the depthwise layer: no energy at all
    result = explain(model, None, tmp_path / "r")
    assert math.isnan(result.layers[1].low_frequency_share) and 0 < result.layers[0].low_frequency_share < 1
    written = json.loads((tmp_path / "r" / "spectra.json").read_text())
    assert [layer["low_frequency_share"] is None for layer in written["layers"]] == [False, True, False]
    assert json.loads(json.dumps(result.to_json(), allow_nan=False))["layers"][1]["low_frequency_share"] is None
    index = (tmp_path / "r" / "index.html").read_text()
    assert "<td>2</td><td>3x3</td><td>undefined (all kernels zero)</td>" in index
    heat = _texts(drawn["spectra_3x3"])
    assert "undefined (all zero)" in heat and f"{result.layers[0].low_frequency_share:.2f}" in heat and "0.00" not in heat
    profile = drawn["profile_3x3"]
    legend = [t.get_text() for t in profile.legends[0].get_texts()]  # type: ignore[attr-defined]
    assert legend == ["0: 0", "1: 2 (all zero: undefined)"]  # the layers, not the dotted reference line (_child)
    zero_line = next(line for line in profile.axes[0].get_lines() if line.get_label().startswith("1: 2"))  # type: ignore[attr-defined]
    assert np.isnan(zero_line.get_ydata()).all()  # not drawn as a profile of zeros


def test_a_legend_names_only_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = _captured_figures(monkeypatch)
    explain(small_model(), None, tmp_path / "r")
    for stem in ("profile_3x3", "profile_3x5"):
        legend = [t.get_text() for t in drawn[stem].legends[0].get_texts()]  # type: ignore[attr-defined]
        assert legend and not any(label.startswith("_") for label in legend), legend


def test_kernel_saliency_of_a_pruned_model_crosses_kernels_still_non_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from explainfix_cli.saliency import spatial_saliency

    drawn = _captured_figures(monkeypatch)
    model, data = small_model(), small_data()
    convs = _spatial(model)
    before = spatial_saliency(model, data)
    flat = torch.cat([before[n].flatten() for n, _ in convs])
    cut = flat.sort().values[len(flat) // 2]  # zero the less salient half, as prune --pct 50 does
    with torch.no_grad():
        for name, conv in convs:
            conv.weight[before[name] < cut] = 0
    zero = {n: c.weight.flatten(2).eq(0).all(dim=2) for n, c in convs}
    alive = sum(int((~z).sum()) for z in zero.values())
    assert 0 < alive < len(flat)

    result = explain(model, data, tmp_path / "r", pct=40, attributions=0)
    from explainfix_cli.explanation.report import PruneMarks

    scores = spatial_saliency(model, data)
    marks = PruneMarks.of(model, scores, 40)
    crossed = torch.cat([marks.zeroed[n].flatten() for n, _ in convs])
    dead = torch.cat([zero[n].flatten() for n, _ in convs])
    ranked = torch.cat([scores[n].flatten() for n, _ in convs]).double()
    assert int(crossed.sum()) == int(0.4 * alive) and not (crossed & dead).any()  # 40 % of the kernels left, none zero
    assert ranked[crossed].max() <= ranked[~crossed & ~dead].min()  # the least salient of those, over all layers
    titles = [ax.get_title() for ax in drawn["kernel_saliency"].axes[:3]]  # type: ignore[attr-defined]
    expected = [f"{n}: {int(marks.zeroed[n].sum())} of {int((~zero[n]).sum())} non-zero crossed" for n, _ in convs]
    assert [t.split(",")[0] for t in titles] == expected
    assert all(t.endswith(f", {int(zero[n].sum())} zero") for t, (n, _) in zip(titles, convs, strict=True) if zero[n].any())
    caption = next(f.caption for f in result.figures if f.name == "kernel_saliency.png")
    prune_pct = 100 * (len(flat) - alive + int(0.4 * alive)) / len(flat)  # what prune, counting all kernels, would take
    assert f"{int(0.4 * alive):,} of {alive:,}, which `explainfix prune --pct {prune_pct:.4g}` would zero" in caption
