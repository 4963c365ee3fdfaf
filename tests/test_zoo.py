"""The sample architectures build and couple channels as documented; the bundled weights are good."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from explainfix_cli.errors import UserError
from explainfix_cli.zoo import MODELS, create_model

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
METRICS: dict[str, Any] = json.loads((SAMPLES / "metrics.json").read_text())
CLASSIFIERS = [name for name in MODELS if name != "unet"]


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _is_spatial(conv: nn.Conv2d) -> bool:
    return all(k > 1 for k in conv.kernel_size)


def _val(stem: str) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(SAMPLES / f"{stem}.npz") as data:
        return torch.from_numpy(data["x"]), torch.from_numpy(data["y"])


def _metric(name: str, logits: torch.Tensor, y: torch.Tensor) -> float:
    if name == "accuracy":
        return int((logits.argmax(1) == y).sum()) / len(y)
    if name == "auc":
        return float(roc_auc_score(y.numpy(), logits.numpy(), average="macro"))
    predicted, truth = logits > 0, y > 0.5
    return 2 * int((predicted & truth).sum()) / (int(predicted.sum()) + int(truth.sum()))


def _sample(name: str) -> nn.Module:
    entry = METRICS["models"][name]
    model = create_model(entry["factory"].split(":")[1], **entry["kwargs"])
    model.load_state_dict(torch.load(SAMPLES / f"{name}.pt", weights_only=True))
    return model.eval()


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_builds_and_has_spatial_convs(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert any(_is_spatial(c) for c in _convs(model))
    params = sum(p.numel() for p in model.parameters())
    assert 10_000 <= params <= 150_000


def test_unet_outputs_one_logit_map_per_class_at_input_resolution() -> None:
    torch.manual_seed(0)
    assert create_model("unet").eval()(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    model = create_model("unet", num_classes=3, in_channels=2).eval()
    assert model(torch.randn(2, 2, 32, 48)).shape == (2, 3, 32, 48)
    assert any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())


def test_factories_take_class_and_channel_counts() -> None:
    for name in CLASSIFIERS:
        model = create_model(name, num_classes=4, in_channels=3).eval()
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)


def test_unknown_model_name_is_a_user_error_listing_the_choices() -> None:
    with pytest.raises(UserError, match="resnet"):
        create_model("alexnet")


def test_shufflenet_has_a_grouped_spatial_conv_that_is_not_depthwise() -> None:
    convs = _convs(create_model("shufflenet"))
    grouped = [c for c in convs if 1 < c.groups < c.in_channels]
    assert any(_is_spatial(c) for c in grouped)
    assert any(c.groups == c.in_channels == c.out_channels for c in convs)


def test_shufflenet_forward_shuffles_the_channels_of_every_v2_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    # `explainfix_cli.zoo.shufflenet` is the factory; the module has to be imported by path.
    module = importlib.import_module("explainfix_cli.zoo.shufflenet")
    shuffle = module.channel_shuffle
    calls: list[tuple[int, int]] = []

    def recording_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
        calls.append((x.shape[1], groups))
        return shuffle(x, groups)

    model = create_model("shufflenet", width=24).eval()
    monkeypatch.setattr(module, "channel_shuffle", recording_shuffle)
    model(torch.randn(2, 1, 16, 16))
    units = [m for m in model.modules() if isinstance(m, module.ShuffleUnit | module.DownsampleUnit)]
    assert len(units) == 3
    assert calls == [(24, 2), (48, 2), (48, 2)]


def test_channel_shuffle_interleaves_the_groups() -> None:
    from explainfix_cli.zoo.shufflenet import channel_shuffle

    x = torch.arange(6.0).view(1, 6, 1, 1).expand(2, 6, 3, 3)  # channel c holds the value c
    assert channel_shuffle(x, 2)[0, :, 0, 0].tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 3)[1, :, 2, 2].tolist() == [0, 2, 4, 1, 3, 5]


def test_mobilenet_has_depthwise_convs_and_squeeze_excitation() -> None:
    model = create_model("mobilenet")
    depthwise = [c for c in _convs(model) if c.groups > 1 and c.groups == c.in_channels]
    assert depthwise and all(_is_spatial(c) for c in depthwise)
    assert any(isinstance(m, nn.Sigmoid) for m in model.modules())


def test_convnext_has_5x5_depthwise_layer_scale_and_eval_only_stochastic_depth() -> None:
    model = create_model("convnext", drop_path=0.5)
    assert any(c.kernel_size == (5, 5) and c.groups == c.in_channels for c in _convs(model))
    gammas = [p for n, p in model.named_parameters() if n.endswith("gamma")]
    assert gammas and all(g.shape[1:] == (1, 1) for g in gammas)
    x = torch.randn(8, 1, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(1)
    assert torch.equal(first, model(x))


def test_vgg_flatten_feeds_a_linear_with_c_h_w_columns() -> None:
    model = create_model("vgg", input_size=24)
    last_conv = _convs(model)[-1]
    first_linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first_linear.in_features == last_conv.out_channels * 6 * 6
    assert model.eval()(torch.randn(2, 1, 24, 24)).shape == (2, 10)


@pytest.mark.parametrize("name", list(METRICS["models"]))
def test_bundled_weights_reach_the_recorded_held_out_metric(name: str) -> None:
    entry = METRICS["models"][name]
    model = _sample(name)
    x, y = _val(Path(entry["data"]).stem)
    with torch.no_grad():
        value = _metric(entry["metric"], model(x), y)
    assert value == pytest.approx(entry["value"], abs=1e-6)
    assert entry["params"] == sum(p.numel() for p in model.parameters())
    assert value >= (0.85 if entry["metric"] == "dice" else 0.95)


def test_every_architecture_has_bundled_weights_in_every_format() -> None:
    for name in MODELS:
        assert {f"{name}.pt", f"{name}.safetensors"} <= set(METRICS["models"][name]["files"])
        assert (SAMPLES / f"{name}.pt").is_file()
        assert (SAMPLES / f"{name}.safetensors").is_file()


def test_wrapped_and_pickled_variants_hold_the_same_weights() -> None:
    wrapped = torch.load(SAMPLES / "resnet_wrapped.pt", weights_only=True)
    plain = torch.load(SAMPLES / "resnet.pt", weights_only=True)
    assert wrapped["epoch"] > 0
    assert all(torch.equal(plain[k], wrapped["state_dict"][k]) for k in plain)

    x, _ = _val("digits_val")
    pickled = torch.load(SAMPLES / "vgg_module.pt", weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(pickled(x), _sample("vgg")(x))


@pytest.mark.parametrize("name", list(MODELS))
def test_bundled_safetensors_give_the_same_outputs_as_the_state_dict(name: str) -> None:
    from explainfix_cli.io.checkpoints import load_model

    x, _ = _val(Path(METRICS["models"][name]["data"]).stem)
    with torch.no_grad():
        assert torch.equal(load_model(SAMPLES / f"{name}.safetensors")(x), _sample(name)(x))


def test_digit_image_folder_holds_ten_val_images_per_class_matching_the_npz() -> None:
    x, y = _val("digits_val")
    stats = METRICS["data"]["digits"]
    for digit in range(10):
        files = sorted((SAMPLES / "digits_images" / str(digit)).glob("*.png"))
        assert len(files) == 10
        for file in files:
            index = int(file.stem)
            assert int(y[index]) == digit
            image = Image.open(file)
            assert image.mode == "L" and image.size == (16, 16)
            expected = np.rint((x[index, 0].numpy() * stats["std"] + stats["mean"]) * 255)
            assert np.abs(np.asarray(image, dtype=np.float64) - expected).max() <= 1
