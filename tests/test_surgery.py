"""Issue 14: removal on patterns torch-pruning only half understands never crashes and never
writes a broken model. Each test zeroes kernels by hand, prunes (`pct=0`: nothing more is
zeroed), writes the file, reloads it, and compares with the zeroed model on data the prune did
not see: exactness is the property that a wrong cut would break."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from typer.testing import CliRunner

from explainfix_cli.cli.app import app
from explainfix_cli.io.checkpoints import ArchSpec, load_model
from explainfix_cli.io.data import Dataset
from explainfix_cli.pruning.pipeline import PruneReport, prune

MODULES = str(Path(__file__).resolve().parent / "surgery_modules.py")
g = torch.Generator().manual_seed(0)
SEEN = Dataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g), batch_size=8)
UNSEEN = torch.randn(16, 1, 8, 8, generator=g)  # (16, 1, 8, 8)


def build(name: str) -> nn.Module:
    with torch.random.fork_rng():  # seeded here, the global generator left as other tests expect it
        torch.manual_seed(0)
        model = ArchSpec(f"{MODULES}:{name}").build()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(0.2, 1)
    return model.eval()


def pruned(name: str, zero: Callable[[nn.Module], None], folder: Path) -> tuple[nn.Module, PruneReport, float]:
    """The pruned model, its report, and max |reloaded - zeroed| on unseen data relative to the logits."""
    model = build(name)
    with torch.no_grad():
        zero(model)
    zeroed = copy.deepcopy(model)
    out = folder / f"{name}.safetensors"
    with torch.random.fork_rng():  # prune seeds the global generator; other tests' models use it
        _, report = prune(model, SEEN, pct=0, arch=ArchSpec(f"{MODULES}:{name}"), out=out)
    with torch.no_grad():
        expected, got = zeroed(UNSEEN), load_model(out)(UNSEEN)
    return model, report, float((got - expected).abs().max() / expected.abs().max())


def test_unequal_split_keeps_its_parts_and_the_rest_is_cut(tmp_path: Path) -> None:
    def zero(m: nn.Module) -> None:
        m.large.weight[:, 1] = 0  # stem channel 3 (part 2, offset 1): nothing reads it any more
        m.fc.weight[:, 0] = 0  # head channel 0: nothing reads it

    model, report, change = pruned("UnequalSplit", zero, tmp_path)
    assert change < 1e-6
    assert report.blocked_groups["split into unequal parts (the model's code keeps their sizes)"] >= 1
    assert model.stem.out_channels == 6 and model.large.in_channels == 4  # the split's parts stay whole
    assert model.head.out_channels == 4 and model.fc.in_features == 4  # elsewhere the cut is made


def test_a_cut_that_breaks_the_forward_pass_is_undone(tmp_path: Path) -> None:
    def zero(m: nn.Module) -> None:
        m.left.weight[:, 0] = 0  # stem channels 0 and 2: one per part, a balanced cut, yet
        m.right.weight[:, 0] = 0  # split(x, 2) of the 2 channels left gives one part, not two

    model, report, change = pruned("FixedWidthSplit", zero, tmp_path)
    assert change < 1e-6
    assert report.blocked_groups["cutting it breaks the model's forward pass"] == 1
    assert model.stem.out_channels == 4 and model.left.in_channels == model.right.in_channels == 2


def test_weight_standardised_conv_keeps_its_inputs_and_cuts_its_gain(tmp_path: Path) -> None:
    def zero(m: nn.Module) -> None:
        m.conv2.weight[:, 0] = 0  # zero in the stored weight, not after standardisation
        m.fc.weight[:, 2] = 0  # conv2's output channel 2: nothing reads it

    model, report, change = pruned("StandardisedNet", zero, tmp_path)
    assert change < 1e-6
    # a plain conv would let conv1's channel 0 go; standardisation subtracts each row's mean,
    # so removing an input changes every row: it stays
    assert model.conv1.out_channels == 4 and model.conv2.in_channels == 4
    assert model.conv2.out_channels == 4 and model.conv2.gain.shape == (4, 1, 1, 1) and report.channels_removed == 1
    # standardised by hand: row 0 read input 0 with a nonzero weight even though it was zeroed
    w = model.conv2.weight.detach().flatten(1)  # (4, 36)
    standardised = (w - w.mean(dim=1, keepdim=True)) / torch.sqrt(w.var(dim=1, unbiased=False, keepdim=True) + 1e-6)
    assert standardised.reshape(4, 4, 9)[:, 0].abs().sum() > 0


def test_attention_heads_are_not_cut(tmp_path: Path) -> None:
    def zero(m: nn.Module) -> None:
        m.proj.weight[:, 0] = 0  # v's channel 0 of head 0: cutting it would change the head width
        m.fc.weight[:, 1] = 0  # proj's output channel 1: nothing reads it

    model, report, change = pruned("SelfAttention", zero, tmp_path)
    assert change < 1e-6
    # torch-pruning's search through q @ k and the head reshapes runs in circles before it meets a reshape
    assert {"coupling torch-pruning cannot enumerate", "reshape of the channel axis (attention heads, split attention, patches)"} & set(report.blocked_groups)
    assert model.qkv.out_channels == 24 and model.proj.in_channels == 8
    assert model.proj.out_channels == 5


def _write(folder: Path, name: str, channels: int) -> tuple[str, str]:
    model = build(name)
    with torch.no_grad():
        model.conv2.weight[:, 1] = 0  # conv1's channel 1: nothing reads it, it leaves
    torch.save(model.state_dict(), folder / "state.pt")
    x = torch.randn(16, channels, 8, 8, generator=torch.Generator().manual_seed(1)).numpy()
    np.savez(folder / "data.npz", x=x, y=np.zeros(16, dtype=np.int64))
    return str(folder / "state.pt"), str(folder / "data.npz")


def test_failure_after_surgery_is_exit_1_and_bad_input_is_exit_2(tmp_path: Path) -> None:
    state, data = _write(tmp_path, "CheckedWidth", channels=1)
    command = ["prune", state, "--arch", f"{MODULES}:CheckedWidth", "--data", data, "--pct", "0", "--out", str(tmp_path / "out.safetensors")]
    with torch.random.fork_rng():  # the command seeds the global generator; other tests' models use it
        failed = CliRunner().invoke(app, command)
    assert failed.exit_code == 1, failed.output
    assert "the model could not be pruned" in failed.stderr and "do not fit" not in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "out.safetensors").exists()

    _, wrong = _write(tmp_path, "CheckedWidth", channels=3)  # the original model cannot read 3 channels
    with torch.random.fork_rng():
        bad = CliRunner().invoke(app, [*command[:5], wrong, *command[6:]])
    assert bad.exit_code == 2, bad.output
    assert "do not fit the model" in bad.stderr and not (tmp_path / "out.safetensors").exists()
