"""Models in and out (docs/cli.md "Models in", "Models out"): every format loads, saves round-trip."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from explainfix_cli.errors import UserError
from explainfix_cli.io.checkpoints import ArchSpec, load_model, open_model, parse_arch, save_model
from explainfix_cli.training.fixed import fix_spatial_filters

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
RESNET = ArchSpec("explainfix_cli.zoo:resnet", {"num_classes": 10, "in_channels": 1})


def _sample(name: str) -> Path:
    path = SAMPLES / name
    if not path.is_file():
        pytest.fail(f"the committed sample {name} is missing (sample_models/make_samples.py makes it)")
    return path


def _x(n: int = 4, c: int = 1, size: int = 16) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(0))


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def resnet_reference() -> torch.Tensor:
    """The sample resnet's outputs, built straight from the factory and its plain state dict."""
    model = RESNET.build()
    model.load_state_dict(torch.load(_sample("resnet.pt"), weights_only=True))
    return _out(model, _x())


# ---- each format loads -------------------------------------------------------------------------
def test_safetensors_loads_without_arch(resnet_reference: torch.Tensor) -> None:
    loaded = open_model(_sample("resnet.safetensors"))
    assert loaded.arch == RESNET
    assert not loaded.model.training
    assert torch.allclose(_out(loaded.model, _x()), resnet_reference, atol=1e-6)


def test_state_dict_with_arch(resnet_reference: torch.Tensor) -> None:
    model = load_model(_sample("resnet.pt"), arch=RESNET)
    assert torch.equal(_out(model, _x()), resnet_reference)


def test_state_dict_with_arch_from_command_line_strings(resnet_reference: torch.Tensor) -> None:
    spec = parse_arch("explainfix_cli.zoo:resnet", '{"num_classes": 10, "in_channels": 1}')
    assert spec == RESNET
    assert torch.equal(_out(load_model(_sample("resnet.pt"), arch=spec), _x()), resnet_reference)


def test_wrapped_state_dict(resnet_reference: torch.Tensor) -> None:
    model = load_model(_sample("resnet_wrapped.pt"), arch=RESNET)
    assert torch.equal(_out(model, _x()), resnet_reference)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_common_wrappers_in_tmp(tmp_path: Path, key: str, resnet_reference: torch.Tensor) -> None:
    state = torch.load(_sample("resnet.pt"), weights_only=True)
    path = tmp_path / "wrapped.pth"
    torch.save({key: state, "epoch": 3, "note": "hello"}, path)
    assert torch.equal(_out(load_model(path, arch=RESNET), _x()), resnet_reference)


def test_dataparallel_prefix(tmp_path: Path, resnet_reference: torch.Tensor) -> None:
    state = torch.load(_sample("resnet.pt"), weights_only=True)
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    assert torch.equal(_out(load_model(path, arch=RESNET), _x()), resnet_reference)


def test_state_dict_without_arch_is_refused() -> None:
    with pytest.raises(UserError, match="`arch`"):
        open_model(_sample("resnet.pt"))


def test_pickled_module_needs_trust() -> None:
    path = _sample("vgg_module.pt")
    with pytest.raises(UserError, match="`trust_checkpoint`"):
        open_model(path)
    loaded = open_model(path, trust_checkpoint=True)
    reference = load_model(_sample("vgg.safetensors"))
    assert torch.allclose(_out(loaded.model, _x()), _out(reference, _x()), atol=1e-6)
    # the pickle's class is importable, so the loader records it as the architecture
    assert loaded.arch is not None and loaded.arch.factory.endswith(":" + type(loaded.model).__qualname__)


def test_unknown_arch_and_bad_kwargs() -> None:
    with pytest.raises(UserError, match="no_such_module"):
        load_model(_sample("resnet.pt"), arch=ArchSpec("no_such_module:resnet"))
    with pytest.raises(UserError, match="no_such_factory"):
        load_model(_sample("resnet.pt"), arch=ArchSpec("explainfix_cli.zoo:no_such_factory"))
    with pytest.raises(UserError, match=r"module\.path:factory"):
        load_model(_sample("resnet.pt"), arch=parse_arch("explainfix_cli.zoo.resnet", None))
    with pytest.raises(UserError, match="JSON"):
        parse_arch("explainfix_cli.zoo:resnet", "{num_classes: 10}")
    with pytest.raises(UserError, match="JSON object"):
        parse_arch("explainfix_cli.zoo:resnet", "[10]")
    with pytest.raises(UserError, match="does not accept"):
        ArchSpec("explainfix_cli.zoo:resnet", {"no_such_kwarg": 1}).build()


def test_wrong_arch_kwargs_names_the_tensor() -> None:
    spec = ArchSpec("explainfix_cli.zoo:resnet", {"num_classes": 5, "in_channels": 1})
    with pytest.raises(UserError, match=r"fc\.weight.*\(10, 64\).*\(5, 64\).*`arch_kwargs`"):
        load_model(_sample("resnet.pt"), arch=spec)


def test_wrong_architecture_names_missing_tensors() -> None:
    with pytest.raises(UserError, match="does not match the architecture"):
        load_model(_sample("resnet.pt"), arch=ArchSpec("explainfix_cli.zoo:vgg", {"in_channels": 1}))


# ---- torch.export -------------------------------------------------------------------------------
def test_exported_program_loads_and_matches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    x = _x(2)
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    loaded = load_model(path)
    assert torch.allclose(loaded(x), _out(model, x), atol=1e-6)


# ---- damaged and foreign files ------------------------------------------------------------------
def _half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = _half(_sample("resnet.safetensors"), tmp_path / "cut.safetensors")
    with pytest.raises(UserError, match="not a readable safetensors"):
        open_model(path)


@pytest.mark.parametrize("trust", [False, True])
def test_truncated_pt(tmp_path: Path, trust: bool) -> None:
    path = _half(_sample("resnet.pt"), tmp_path / "cut.pt")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        open_model(path, RESNET, trust_checkpoint=trust)
    path = _half(_sample("vgg_module.pt"), tmp_path / "cut_module.pt")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        open_model(path, trust_checkpoint=trust)


@pytest.mark.parametrize("text", ["hello world, this is not a model\n", "abc", ""])
def test_text_file_named_pt(tmp_path: Path, text: str) -> None:
    path = tmp_path / "notes.pt"
    path.write_text(text)
    with pytest.raises(UserError, match=r"notes\.pt"):
        open_model(path, RESNET)


def test_safetensors_of_bare_tensors_needs_arch(tmp_path: Path, resnet_reference: torch.Tensor) -> None:
    from safetensors.torch import save_file

    state = torch.load(_sample("resnet.pt"), weights_only=True)
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(UserError, match="`arch`"):
        open_model(path)
    assert torch.equal(_out(load_model(path, arch=RESNET), _x()), resnet_reference)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        open_model(tmp_path / "nothing.safetensors")


# ---- save_model / load_model round trip --------------------------------------------------------
def test_round_trip_restores_outputs_and_fixed_tensors(tmp_path: Path) -> None:
    model = load_model(_sample("resnet.safetensors"))
    fixed = set(fix_spatial_filters(model))
    assert fixed
    out = save_model(model, tmp_path / "fixed.safetensors", arch=RESNET, history=[{"step": "fix"}])
    again = load_model(out)
    assert torch.equal(_out(again, _x()), _out(model, _x()))
    grads = {name: p.requires_grad for name, p in again.named_parameters()}
    assert {name for name, g in grads.items() if not g} == fixed
    assert any(grads.values())  # the rest stays trainable
    assert open_model(out).history == [{"step": "fix"}]


def test_round_trip_of_a_pruned_model(tmp_path: Path) -> None:
    from explainfix_cli.io.data import Dataset
    from explainfix_cli.pruning.pipeline import prune

    model = load_model(_sample("vgg.safetensors"))
    original_params = sum(p.numel() for p in model.parameters())
    x = _x(16)
    data = Dataset(x, torch.arange(16) % 10, batch_size=16)
    out = tmp_path / "pruned.safetensors"
    pruned, report = prune(model, data, pct=80, out=out, arch=ArchSpec("explainfix_cli.zoo:vgg", {"in_channels": 1, "input_size": 16}))
    assert report.channels_removed > 0 and report.params_after < original_params
    again = load_model(out)
    assert sum(p.numel() for p in again.parameters()) == report.params_after
    assert torch.equal(_out(again, x), _out(pruned, x))
    assert {n for n, p in again.named_parameters() if not p.requires_grad} == {
        n for n, p in pruned.named_parameters() if not p.requires_grad
    }


# ---- a class defined in a script: not rebuildable from an importable factory -------------------
NET_SCRIPT = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.mix = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        x = self.mix(self.conv(x).relu()).relu()
        return self.head(x.mean(dim=(2, 3)))
'''


def test_script_class_needs_arch_path(tmp_path: Path) -> None:
    script = tmp_path / "net_script.py"
    script.write_text(textwrap.dedent(NET_SCRIPT))
    spec = importlib.util.spec_from_file_location("net_script", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["net_script"] = module
    try:
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        net = module.Net().eval()
        pickled = tmp_path / "net.pt"
        torch.save(net, pickled)

        with pytest.raises(UserError, match="`trust_checkpoint`"):
            open_model(pickled)
        loaded = open_model(pickled, trust_checkpoint=True)
        assert loaded.arch == ArchSpec("net_script:Net")
        out = save_model(loaded.model, tmp_path / "net.safetensors", arch=loaded.arch)
    finally:
        del sys.modules["net_script"]  # as in a fresh process: the script is not importable

    with pytest.raises(UserError, match=r"`arch` path/to/script\.py:ClassName"):
        load_model(out)
    rebuilt = load_model(out, arch=ArchSpec(f"{script}:Net"))
    x = _x(3)
    assert torch.equal(_out(rebuilt, x), _out(net, x))
    # the string form works too
    assert torch.equal(_out(load_model(out, arch=f"{script}:Net"), x), _out(net, x))


FACTORIES_SCRIPT = """
import torch
from torch import nn


class WithBuffer(nn.Module):  # a non-persistent buffer: not in the state dict
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.register_buffer("scale", torch.arange(1.0, 3.0).reshape(1, 2, 1, 1), persistent=False)

    def forward(self, x):
        return self.conv(x) * self.scale


class WithAttribute(WithBuffer):  # a plain tensor attribute, not registered at all
    def __init__(self):
        super().__init__()
        del self.scale
        self.scale = torch.arange(1.0, 3.0).reshape(1, 2, 1, 1)


class ComputesAtInit(WithBuffer):  # reads a tensor's value while building
    def __init__(self):
        super().__init__()
        self.factor = float(self.conv.weight.abs().max().item() > -1)

    def forward(self, x):
        return super().forward(x) * self.factor
"""


@pytest.mark.parametrize("name", ["WithBuffer", "WithAttribute", "ComputesAtInit"])
def test_build_falls_back_from_the_meta_device(tmp_path: Path, name: str) -> None:
    # the build runs on the meta device (no random initialisation); when the file cannot fill
    # every tensor, or the factory needs real values, it is built again for real
    script = tmp_path / "factories.py"
    script.write_text(FACTORIES_SCRIPT)
    spec = ArchSpec(f"{script}:{name}")
    torch.manual_seed(0)
    net = spec.build().eval()
    torch.save(net.state_dict(), tmp_path / "state.pt")
    x = _x(2)
    for path in (tmp_path / "state.pt", save_model(net, tmp_path / "net.safetensors", arch=spec)):
        loaded = load_model(path, arch=spec)
        assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
        assert torch.equal(_out(loaded, x), _out(net, x))


def test_common_architectures_build_on_the_meta_device(monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[str] = []
    original = ArchSpec.build

    def counting(self: ArchSpec) -> nn.Module:
        model = original(self)
        builds.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(ArchSpec, "build", counting)
    load_model(_sample("resnet.pt"), arch=RESNET)
    assert builds == ["meta"]  # one build, no random initialisation


def test_tied_weights_save_and_load(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1)).eval()
    net[2].weight = net[0].weight  # one tensor under two names: safetensors refuses shared memory
    out = save_model(net, tmp_path / "tied.safetensors", arch=ArchSpec("torch.nn:Identity"))
    rebuilt = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 1, 3, padding=1)).eval()
    from safetensors.torch import load_file

    rebuilt.load_state_dict(load_file(str(out)))
    assert torch.equal(_out(rebuilt, _x(2)), _out(net, _x(2)))
    assert net[0].weight.data_ptr() == net[2].weight.data_ptr()  # saving copied, the model is untouched


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_save_model_leaves_nothing_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def broken_save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(OSError, match="No space"):
        save_model(model, tmp_path / "m.safetensors", arch=None)
    assert _names(tmp_path) == []


def test_arch_given_as_a_relative_path_is_found_from_another_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "my_net.py").write_text(textwrap.dedent(NET_SCRIPT))
    monkeypatch.chdir(project)
    arch = parse_arch("my_net.py:Net", None)
    assert arch is not None and Path(arch.factory.partition(":")[0]).is_absolute()
    net = arch.build().eval()
    out = save_model(net, project / "net.safetensors", arch=arch)
    monkeypatch.chdir(tmp_path)  # `cd elsewhere && explainfix info project/net.safetensors`
    x = _x(3)
    assert torch.equal(_out(load_model(out), x), _out(net, x))
    (project / "my_net.py").rename(tmp_path / "moved.py")
    with pytest.raises(UserError, match=r"`arch` path/to/script\.py:ClassName"):
        load_model(out)


def test_a_factory_recorded_before_the_layout_by_stage_still_resolves() -> None:
    from explainfix_cli.classes.extract import one_vs_rest
    from explainfix_cli.io.checkpoints import resolve_factory

    assert resolve_factory("explainfix_cli.classes:one_vs_rest") is one_vs_rest  # what extract recorded before
    assert resolve_factory("explainfix_cli.classes.extract:one_vs_rest") is one_vs_rest


def test_a_missing_arch_file_is_named_as_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "some" / "where" / "nosuch.py"
    with pytest.raises(UserError) as caught:
        open_model(_sample("resnet.pt"), parse_arch(f"{missing}:Net", None))
    message = str(caught.value)
    assert f"the file {missing} does not exist" in message and "cannot import" not in message, message


def test_a_pickled_module_from_a_script_loads_with_arch_naming_the_script(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    script = folder / "user_script.py"
    script.write_text(textwrap.dedent(NET_SCRIPT))
    sys.path.insert(0, str(folder))  # as when the user trained it: `from user_script import Net`
    try:
        import user_script  # type: ignore[import-not-found]

        torch.manual_seed(0)
        net = user_script.Net().eval()
        pickled = tmp_path / "net.pt"
        torch.save(net, pickled)
    finally:
        sys.path.remove(str(folder))
        del sys.modules["user_script"]  # a fresh process, without PYTHONPATH
    with pytest.raises(UserError, match=r"cannot be imported here.*`arch` path/to/script\.py:ClassName"):
        open_model(pickled, trust_checkpoint=True)
    path_before = list(sys.path)
    loaded = open_model(pickled, parse_arch(f"{script}:Net", None), trust_checkpoint=True)
    assert loaded.arch == ArchSpec(f"{script.resolve()}:Net")  # the path form, found again from any folder
    assert sys.path == path_before  # importable for that load only
    x = _x(3)
    assert torch.equal(_out(loaded.model, x), _out(net, x))
    out = save_model(loaded.model, tmp_path / "net.safetensors", arch=loaded.arch)
    sys.modules.pop("user_script", None)
    assert torch.equal(_out(load_model(out), x), _out(net, x))  # the recorded path rebuilds it, no --arch
