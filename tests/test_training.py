"""Fine-tuning (training.py, `explainfix finetune`), and training under torchrun."""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SAMPLES, sample_data, sample_model
from torch import nn
from typer.testing import CliRunner

from explainfix_cli.cli import app as cli
from explainfix_cli.cli import train as cli_train
from explainfix_cli.errors import UserError
from explainfix_cli.evaluation.measure import metric, outputs
from explainfix_cli.io.checkpoints import load_model, open_model
from explainfix_cli.io.data import Dataset, load_data
from explainfix_cli.models import spatial_convs
from explainfix_cli.pruning.pipeline import prune
from explainfix_cli.training.finetune import Recipe, finetune
from explainfix_cli.training.losses import distill_loss, loss_for

FIELDS = {"metric_before", "metric_after", "best_epoch", "epochs", "seconds_per_epoch", "trainable_params", "params", "out"}
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def small_train() -> Dataset:
    return load_data(SAMPLES / "digits_train.npz", batch_size=32, batches=8)  # 256 samples


@pytest.fixture(scope="module")
def small_val() -> Dataset:
    full = load_data(SAMPLES / "digits_val.npz")
    return Dataset(full.x[:120], full.y[:120], batch_size=64)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory, small_val: Dataset) -> Path:
    """The ResNet sample pruned at 90 % (spatial filters fixed), written to a file."""
    out = tmp_path_factory.mktemp("pruned") / "resnet-90.safetensors"
    loaded = open_model(SAMPLES / "resnet.safetensors")
    prune(loaded.model, small_val, pct=90, arch=loaded.arch, out=out)
    return out


def _finetune(*args: str) -> dict:
    result = CliRunner().invoke(cli.app, ["finetune", *args, "--json"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1
    return json.loads(result.stdout)


# ---- losses --------------------------------------------------------------------------------------
def test_task_loss_by_target_kind_against_hand_computation() -> None:
    out = torch.tensor([[2.0, 0.0, -1.0]])
    ce = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    torch.testing.assert_close(loss_for("labels")(out, torch.tensor([0])), torch.tensor(ce))
    # one mask of two pixels, logits (0, 0) → p = (0.5, 0.5); truth (1, 0)
    mask_out, mask_y = torch.zeros(1, 1, 1, 2), torch.tensor([[[[1.0, 0.0]]]])
    bce = math.log(2)  # -log 0.5 at both pixels
    dice = (2 * 0.5 + 1) / (1.0 + 1.0 + 1)  # smoothed soft Dice: (2·Σpt + 1) / (Σp + Σt + 1)
    torch.testing.assert_close(loss_for("mask")(mask_out, mask_y), torch.tensor(bce + 1 - dice))
    torch.testing.assert_close(loss_for("multilabel")(mask_out.flatten(1), mask_y.flatten(1)), torch.tensor(bce))


def test_distillation_is_zero_only_when_the_student_matches_the_teacher() -> None:
    teacher = torch.tensor([[3.0, 1.0, -2.0]])
    assert float(distill_loss(teacher.clone(), teacher, "labels", 4.0)) == pytest.approx(0, abs=1e-6)
    student = torch.tensor([[0.0, 1.0, 0.0]])
    t = 4.0
    p, q = F.softmax(student / t, dim=1), F.softmax(teacher / t, dim=1)
    kl = float((q * (q / p).log()).sum()) * t * t
    assert float(distill_loss(student, teacher, "labels", t)) == pytest.approx(kl, rel=1e-5)
    # per pixel for masks: the gradient vanishes where the student's softened logit equals the teacher's
    mask_t = torch.randn(1, 1, 4, 4)
    s = mask_t.clone().requires_grad_(True)
    distill_loss(s, mask_t, "mask", 2.0).sum().backward()
    assert float(s.grad.abs().max()) < 1e-6


# ---- finetune ------------------------------------------------------------------------------------
def test_finetune_recovers_a_pruned_model_and_keeps_the_best_epoch(pruned: Path, small_train: Dataset, small_val: Dataset) -> None:
    model = load_model(pruned)
    fixed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    state = torch.get_rng_state()
    model, report = finetune(model, small_train, small_val, recipe=Recipe(epochs=3, train="unfixed"))  # the spatially fixed form, asked for
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert report.metric_after > report.metric_before + 0.3  # pruned at 90 % it starts near chance
    # the model returned is the best epoch's, and the report says so
    value = metric(small_val, outputs(model, small_val))
    assert value == pytest.approx(report.metric_after)
    assert report.metric_after == max(r.metric for r in report.history)
    assert report.history[report.best_epoch - 1].metric == report.metric_after
    for name, p in model.named_parameters():  # only what was not fixed has moved
        if name in fixed:
            assert torch.equal(p, fixed[name]) and not p.requires_grad
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad) < report.params


def test_train_all_unfreezes_the_spatial_filters(pruned: Path, small_train: Dataset, small_val: Dataset) -> None:
    model = load_model(pruned)
    conv = spatial_convs(model)[0][1]
    before = conv.weight.detach().clone()
    few = Dataset(small_train.x[:64], small_train.y[:64], batch_size=32)
    _, report = finetune(model, few, small_val, recipe=Recipe(epochs=1, train="all"))
    assert report.trainable_params == report.params
    assert conv.weight.requires_grad and not torch.equal(conv.weight.detach(), before)


def test_cli_finetune_writes_a_loadable_pruned_fixed_model_same_bytes_for_same_seed(pruned: Path, tmp_path: Path) -> None:
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    reports = [
        _finetune(str(pruned), "--data", str(SAMPLES / "digits_train.npz"), "--batches", "4", "--batch-size", "32",
                  "--val", str(SAMPLES / "digits_val.npz"), "--epochs", "2", "--teacher", str(SAMPLES / "resnet.safetensors"),
                  "--train", "unfixed", "--out", str(out))
        for out in outs
    ]  # fmt: skip
    assert set(reports[0]) >= FIELDS
    assert outs[0].read_bytes() == outs[1].read_bytes()
    tuned, original = open_model(outs[0]), open_model(pruned)
    assert [h["step"] for h in tuned.history] == ["prune", "finetune"]
    assert tuned.history[-1]["best_epoch"] == reports[0]["best_epoch"]
    # the pruned architecture and the fixed flags survive the round trip
    assert {n: p.shape for n, p in tuned.model.named_parameters()} == {n: p.shape for n, p in original.model.named_parameters()}
    assert {n for n, p in tuned.model.named_parameters() if not p.requires_grad} == set(original.metadata["fixed"])
    val = load_data(SAMPLES / "digits_val.npz")
    assert metric(val, outputs(tuned.model, val)) == pytest.approx(reports[0]["metric_after"])


def test_max_minutes_stops_after_the_first_epoch(pruned: Path, tmp_path: Path) -> None:
    report = _finetune(str(pruned), "--data", str(SAMPLES / "digits_train.npz"), "--batches", "2", "--val", str(SAMPLES / "digits_val.npz"),
                       "--epochs", "5", "--max-minutes", "0", "--out", str(tmp_path / "t.safetensors"))  # fmt: skip
    assert report["epochs"] == 1 and report["stopped_early"]


def test_cli_defaults_are_the_recipe() -> None:
    defaults = {name: p.default for name, p in inspect.signature(cli_train.finetune).parameters.items()}
    recipe = Recipe()
    for name in ("epochs", "lr", "norm_lr_scale", "weight_decay", "distill_weight", "temperature"):
        assert defaults[name] == getattr(recipe, name)
    assert (defaults["optimizer"].value, defaults["batch_norm"].value, defaults["train"].value) == (recipe.optimizer, recipe.batch_norm, recipe.train)


@pytest.mark.parametrize(("option", "value"), [("lr", "nan"), ("lr", "inf"), ("lr", "0"), ("norm-lr-scale", "nan"), ("weight-decay", "nan"),
                                               ("weight-decay", "-0.5"), ("temperature", "-2"), ("distill-weight", "nan"), ("max-minutes", "-1")])  # fmt: skip
def test_a_number_out_of_range_is_refused_before_anything_is_loaded(option: str, value: str, tmp_path: Path) -> None:
    """NaN compares false with everything, so a check like `lr <= 0` let it through: Adam then
    raised from deep inside (exit 1), and a NaN normalisation rate trained without a word."""
    out = tmp_path / "t.safetensors"
    result = CliRunner().invoke(cli.app, ["finetune", str(SAMPLES / "resnet.safetensors"), "--data", str(SAMPLES / "digits_train.npz"),
                                      "--val", str(SAMPLES / "digits_val.npz"), "--epochs", "1", f"--{option}", value, "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2 and result.stdout == "" and not out.exists(), result.output
    assert result.stderr.count("\n") == 1 and f"--{option} must be" in result.stderr and value in result.stderr
    with pytest.raises(UserError):
        Recipe(**{option.replace("-", "_"): float(value)})


def test_normalisation_parameters_learn_at_their_own_rate() -> None:
    # Adam's first step moves every parameter with a gradient by lr * g / (|g| + eps), i.e. by lr:
    # a conv or linear weight by 1e-2, a batch norm's scale and shift by 10 x 1e-2
    from explainfix_cli.training.optimizer import optimizer_for, parameter_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1, bias=False), torch.nn.BatchNorm2d(3), torch.nn.Flatten(), torch.nn.Linear(12, 2))
    model[0].weight.requires_grad_(False)  # fixed, as a spatial filter: in no group
    recipe = Recipe(lr=1e-2, norm_lr_scale=10.0)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = parameter_groups(model, params, recipe)
    assert [len(g["params"]) for g in groups] == [2, 2] and [g["lr"] for g in groups] == [1e-2, pytest.approx(1e-1)]
    optimizer = optimizer_for(groups, recipe)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_for("labels")(model(torch.randn(8, 1, 2, 2)), torch.tensor([0, 1] * 4)).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        step = (p.detach() - before[name]).abs()  # every entry has a gradient here
        expected = 0.0 if name == "0.weight" else 0.1 if name.startswith("1.") else 0.01
        assert torch.allclose(step, torch.full_like(step, expected), rtol=1e-3), name
    assert parameter_groups(model, params, Recipe())[1]["lr"] == 1e-2  # the default: one rate


def test_finetune_bad_input_exit_2(tmp_path: Path) -> None:
    fixed_all = tmp_path / "f.safetensors"
    model = load_model(SAMPLES / "vgg.safetensors")
    for p in model.parameters():
        p.requires_grad_(False)
    from explainfix_cli.io.checkpoints import save_model

    save_model(model, fixed_all, arch=open_model(SAMPLES / "vgg.safetensors").arch)
    out = tmp_path / "o.safetensors"
    base = ["finetune", "--data", str(SAMPLES / "digits_train.npz"), "--val", str(SAMPLES / "digits_val.npz"), "--out", str(out)]
    result = CliRunner().invoke(cli.app, [*base[:1], str(fixed_all), *base[1:]])
    assert result.exit_code == 2 and "nothing to train" in result.stderr
    result = CliRunner().invoke(cli.app, [*base[:1], str(SAMPLES / "unet.safetensors"), *base[1:]])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not out.exists()


# ---- torchrun ------------------------------------------------------------------------------------
def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "explainfix_cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-20000:]
    return proc


def test_torchrun_saliency_equals_single_process(tmp_path: Path) -> None:
    args = ["saliency", str(SAMPLES / "resnet.safetensors"), "--data", str(SAMPLES / "digits_val.npz"), "--batch-size", "32", "--batches", "5"]
    _torchrun(*args, "--out", str(tmp_path / "two.safetensors"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: a sum over more threads rounds differently
    try:
        assert CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "one.safetensors")]).exit_code == 0
    finally:
        torch.set_num_threads(threads)
    from safetensors.torch import load_file

    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert list(one) == list(two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-9, atol=1e-12)


def test_torchrun_prune_reads_each_minibatch_once_and_measures_as_one_process(tmp_path: Path) -> None:
    # both passes of a prune are sharded: process 0 decodes minibatches 0, 2, 4 (96 samples) and
    # process 1 minibatches 1, 3 (64), twice each (saliency, then the metric after), plus the one
    # example that traces the model; an unsharded metric pass would read all 160 on both
    proc = _worker("prune-reads", str(tmp_path / "reads.json"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    reports = json.loads((tmp_path / "reads.json").read_text())
    assert [r["decoded"] for r in reports] == [2 * 96 + 1, 2 * 64 + 1]
    from explainfix_cli.io.sources.arrays import ArraySource

    memory = load_data(SAMPLES / "digits_train.npz")
    data = Dataset(source=ArraySource(memory.x[:160], memory.y[:160]), batch_size=32)
    _, alone = prune(open_model(SAMPLES / "resnet.safetensors").model, data, pct=50)
    assert data.source.decoded == 2 * 160 + 1
    for r in reports:  # every process measured every sample: the metrics of one process reading all
        assert r["metric_before"] == pytest.approx(alone.metric_before, abs=1e-9)
        assert r["metric_after"] == pytest.approx(alone.metric_after, abs=1e-9)


def test_torchrun_finetune_epoch_matches_single_process(pruned: Path, tmp_path: Path) -> None:
    # frozen batch norms: batch statistics would be per process on CPU (SyncBatchNorm needs a GPU)
    args = ["finetune", str(pruned), "--data", str(SAMPLES / "digits_train.npz"), "--batch-size", "30", "--batches", "4",
            "--val", str(SAMPLES / "digits_val.npz"), "--epochs", "1", "--batch-norm", "frozen", "--json"]  # fmt: skip
    proc = _torchrun(*args, "--out", str(tmp_path / "two.safetensors"))
    two = json.loads(proc.stdout)  # only process 0 prints
    one = _finetune(*args[1:-1], "--out", str(tmp_path / "one.safetensors"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], rel=1e-5)
    a, b = load_model(tmp_path / "one.safetensors"), load_model(tmp_path / "two.safetensors")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
    assert not any(p.is_file() for p in tmp_path.glob(".two*"))  # no temporary file of another process left


def _worker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(Path(__file__).parent / "distributed_worker.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_processes_end_with_the_same_model_under_batch_statistics(tmp_path: Path) -> None:
    # each process updates its running statistics on its own shard; process 0's are taken after
    # every epoch, so all validate alike, keep the same epoch, and a search over fine-tuned probes
    # (`prune --max-drop --finetune-epochs` under torchrun) takes one path in all of them
    proc = _worker("same-model", str(tmp_path / "all.json"))
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # a rare abort inside torch's C++ (about 1 run in 30 here, only beside other test
        # processes; not reproduced alone in 80 runs, nor under load with faulthandler): once more,
        # so that the same assertions decide; a second abort fails the test
        proc = _worker("same-model", str(tmp_path / "all.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = json.loads((tmp_path / "all.json").read_text())
    assert first["metrics"] == second["metrics"] and first["best_epoch"] == second["best_epoch"]
    assert first["state"] == second["state"]
    assert len(first["metrics"]) == 2


def test_torchrun_a_process_that_fails_ends_the_job_instead_of_hanging() -> None:
    proc = _worker("one-fails", timeout=90)  # before: process 1 waited in a barrier at exit, process 0 in its own
    assert proc.returncode != 0 and "explainfix: failed: RuntimeError: process 1 gave up" in proc.stderr


def test_class_gates_train_a_model_that_keeps_its_architecture(tmp_path: Path) -> None:
    # docs/method.md §6: three epochs = one standard, two gated; the gates shape training, then go
    from typer.testing import CliRunner

    from explainfix_cli.cli.app import app
    from explainfix_cli.io.checkpoints import load_model

    samples = Path(__file__).resolve().parents[1] / "sample_models"
    args = ["finetune", str(samples / "resnet.safetensors"), "--data", str(samples / "digits_val.npz"), "--val", str(samples / "digits_val.npz"), "--epochs", "3", "--json"]
    plain = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "plain.safetensors")])
    gated = CliRunner().invoke(app, [*args, "--class-gates", "--out", str(tmp_path / "gated.safetensors")])
    assert plain.exit_code == 0 and gated.exit_code == 0, gated.output
    report = json.loads(gated.stdout)
    assert report["recipe"]["class_gates"] is True
    # epoch 1 is the standard path in both runs (same seed, same steps); epochs 2 and 3 are gated
    losses = [[r["loss"] for r in json.loads(run.stdout)["history"]] for run in (plain, gated)]
    assert losses[0][0] == losses[1][0] and losses[0][1:] != losses[1][1:]
    a, b = load_model(tmp_path / "plain.safetensors").state_dict(), load_model(tmp_path / "gated.safetensors").state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    masks = CliRunner().invoke(app, ["finetune", str(samples / "unet.safetensors"), "--data", str(samples / "nuclei_val.npz"), "--val", str(samples / "nuclei_val.npz"), "--class-gates", "--out", str(tmp_path / "u.safetensors")])
    assert masks.exit_code == 2 and "class labels" in masks.stderr


def test_finetune_class_gates_is_class_gated_step(small_val: Dataset) -> None:
    """`finetune --class-gates` trains through `classes.class_gated_step` with the recipe's gate
    settings: three epochs of one minibatch (standard, gated, gated) give the losses of three
    direct calls with the same optimiser and schedule. The third depends on the gate's step."""
    from explainfix_cli.classes.gates import GATE_SPARSITY, ClassGates, class_gated_step, uses_gates
    from explainfix_cli.training.optimizer import parameter_groups

    loaded = open_model(SAMPLES / "resnet.safetensors")
    batch = Dataset(small_val.x[:48], small_val.y[:48], batch_size=48)
    recipe = Recipe(epochs=3, class_gates=True, batch_norm="frozen")
    assert recipe.gate_sparsity == GATE_SPARSITY == 4.0  # one default, what the product ran
    _, report = finetune(copy.deepcopy(loaded.model), batch, batch, recipe=recipe)
    model = copy.deepcopy(loaded.model).train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    optimizer = torch.optim.Adam(parameter_groups(model, [p for p in model.parameters() if p.requires_grad], recipe), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3)
    gates = ClassGates.for_model(model, batch.x[:1])
    losses: list[float] = []

    def cross_entropy(out: torch.Tensor) -> torch.Tensor:
        value = F.cross_entropy(out, batch.y)
        losses.append(float(value.detach()))
        return value

    for epoch in range(3):
        class_gated_step(model, gates, batch.x, batch.y, optimizer, uses_gates(epoch), loss=cross_entropy)
        schedule.step()
    assert [r.loss for r in report.history] == pytest.approx(losses, rel=1e-6, abs=2e-6)  # float32, rounded to 6 places
    assert len(set(losses)) == 3


def test_amp_trains_in_half_precision_and_keeps_float32_weights() -> None:
    # --amp: the forward passes of training run in bfloat16 on the CPU (float16 with loss scaling
    # on CUDA); the weights, the written model and the validation stay float32
    from explainfix_cli.training.precision import Precision

    model = sample_model("resnet").model
    data = sample_data("resnet", batch_size=32, batches=3)
    seen: set[torch.dtype] = set()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    handle = first.register_forward_hook(lambda m, i, o: seen.add(o.dtype) if m.training else None)
    tuned, report = finetune(model, data, data, recipe=Recipe(epochs=1, amp=True, train="all"))
    handle.remove()
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in tuned.parameters())
    assert report.recipe["amp"] is True and all(math.isfinite(r.loss) for r in report.history)
    assert report.metric_after is not None and report.metric_after >= report.metric_before
    assert Precision(True, "cpu").scaler is None and Precision(False, "cpu").autocast() is not None
    with pytest.raises(UserError, match="mixed precision and class-specific gate training"):
        Recipe(amp=True, class_gates=True)


# ---- memory layout (training.layout) -------------------------------------------------------------
def test_training_runs_channels_last_on_the_cpu_and_returns_a_contiguous_model(pruned: Path, small_train: Dataset, small_val: Dataset) -> None:
    # auto trains in NHWC on the CPU (0.5-0.6x the step time, benchmarks/channels_last.py): the
    # weights are channels-last during the epochs, contiguous again after, and the result is the
    # NCHW run's but for rounding
    from explainfix_cli.training import layout

    seen: list[bool] = []
    model = load_model(pruned)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1 and m.weight.shape[1] > 1]
    assert convs

    def during(_: object) -> None:
        seen.append(convs[0].weight.is_contiguous(memory_format=torch.channels_last) and not convs[0].weight.is_contiguous())

    last, report_last = finetune(model, small_train, small_val, recipe=Recipe(epochs=2), on_epoch=during)
    _, report_flat = finetune(load_model(pruned), small_train, small_val, recipe=Recipe(epochs=2, memory_format="contiguous"))
    assert seen == [True, True] and layout.channels_last("auto", "cpu") and not layout.channels_last("auto", "cuda")
    assert all(t.is_contiguous() for t in last.state_dict().values())  # written as read (safetensors needs it)
    # the same training, rounded apart (which Adam's steps then carry on)
    assert report_last.history[0].loss == pytest.approx(report_flat.history[0].loss, rel=2e-3)
    assert report_last.metric_after == pytest.approx(report_flat.metric_after, abs=0.03)
    with pytest.raises(UserError, match=r"^`memory_format` must be one of auto, channels-last, contiguous, not 'nhwc'\.$"):
        Recipe(memory_format="nhwc")  # type: ignore[arg-type]
