"""Training what is not fixed: fine-tuning a pruned model, or training a fixed one from scratch.

ExplainFix's claim (docs/method.md §4) is that spatially fixed, pruned networks match the learned ones
once their remaining parameters are trained. `finetune` trains those parameters (or all of them),
with the loss of the target kind, optional knowledge distillation from a teacher, and keeps the
best epoch by the validation metric. Under `torchrun` it trains with DistributedDataParallel, each
process a shard of every global minibatch, so one epoch equals the single-process epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from explainfix_cli.choices import BatchNormMode, MemoryFormat, OptimizerName, Trainable
from explainfix_cli.classes.gates import GATE_LR, GATE_SPARSITY, ClassGates, class_gated_step, uses_gates
from explainfix_cli.distributed import rank_and_world
from explainfix_cli.errors import UserError, check_range
from explainfix_cli.evaluation.measure import metric, outputs
from explainfix_cli.io.checkpoints import LoadedModel, save_model
from explainfix_cli.io.data import Dataset, TargetKind
from explainfix_cli.io.outputs import check_target
from explainfix_cli.models import model_output
from explainfix_cli.numbers import finite
from explainfix_cli.training.layout import as_input, channels_last, trained_in
from explainfix_cli.training.losses import distill_loss, loss_for
from explainfix_cli.training.narrowing import reading_used_inputs, skipping_unread_channels
from explainfix_cli.training.optimizer import optimizer_for, parameter_groups
from explainfix_cli.training.precision import Precision
from explainfix_cli.training.trainable import (
    ESCALATION_GAP,
    FORM_IN_WORDS,
    TrainableChoice,
    choose_trainable,
    escalates,
    next_form,
    trained_as,
)


@dataclass(frozen=True)
class Recipe:
    """How to train: the defaults are the recipe measured on the bundled samples (README)."""

    epochs: int = 20
    lr: float = 1e-2
    norm_lr_scale: float = 1.0  # normalisation layers' scales and shifts learn at this multiple of lr (docs/method.md §4)
    weight_decay: float = 0.0
    optimizer: OptimizerName = "adam"
    train: Trainable = "auto"  # "auto": "unfixed" or "masked" by what is left to learn (training.trainable); "all" unfreezes everything
    batch_norm: BatchNormMode = "train"  # "frozen": running statistics kept, affine still learned
    distill_weight: float = 0.5  # share of the distillation term when a teacher is given
    temperature: float = 4.0  # softening of the teacher's and the student's logits
    max_minutes: float | None = None
    seed: int = 0
    amp: bool = False  # mixed precision: float16 with loss scaling on CUDA, bfloat16 on the CPU (training.precision)
    memory_format: MemoryFormat = "auto"  # the layout it trains in (training.layout): auto = channels-last on the CPU
    class_gates: bool = False  # docs/method.md §6: CSG training, one standard epoch then two gated
    gate_sparsity: float = GATE_SPARSITY  # weight of the gate's L1 norm on gated steps (measured on the ResNet sample)
    gate_lr: float = GATE_LR  # the gate's own plain gradient step

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, 0)
        for name in ("lr", "norm_lr_scale", "temperature", "gate_lr"):
            check_range(name, getattr(self, name), 0, above_low=True)
        for name in ("weight_decay", "max_minutes"):  # max_minutes 0: one epoch, the least that runs
            check_range(name, getattr(self, name), 0)
        check_range("distill_weight", self.distill_weight, 0, 1)
        check_range("gate_sparsity", self.gate_sparsity, 0)
        if self.memory_format not in get_args(MemoryFormat):
            raise UserError(f"`memory_format` must be one of {', '.join(get_args(MemoryFormat))}, not {self.memory_format!r}.")
        if self.amp and self.class_gates:
            raise UserError("mixed precision and class-specific gate training do not go together (the gate's own step reads unscaled gradients); drop `amp` or `class_gates`.")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochRecord:
    """One epoch: mean training loss, validation metric, seconds spent training and validating."""

    epoch: int
    loss: float
    metric: float | None
    seconds: float
    val_seconds: float


@dataclass
class FinetuneReport:
    """What `finetune` did (docs/cli.md `finetune --json`)."""

    metric: str
    metric_before: float | None
    metric_after: float | None
    best_epoch: int  # 0: no epoch beat the model as given, which is kept
    epochs: int  # epochs run (fewer than asked when --max-minutes stopped early)
    seconds_per_epoch: float
    trainable_params: int
    params: int
    stopped_early: bool
    processes: int
    recipe: dict[str, Any]
    history: list[EpochRecord] = field(default_factory=list)
    out: str | None = None
    trainable: str = "unfixed"  # what was trained: "unfixed", "masked" or "all" (training.trainable)
    trainable_reason: str = ""  # why, in one sentence

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def history_step(self) -> dict[str, Any]:
        """The entry for the file's history: every number except timings, so reruns write the same bytes."""
        step = {k: v for k, v in self.to_json().items() if k not in ("seconds_per_epoch", "history", "out", "processes")}
        step["history"] = [{"epoch": r.epoch, "loss": r.loss, "metric": r.metric} for r in self.history]
        return {"step": "finetune", **step}


def batch_loss(out: torch.Tensor, y: torch.Tensor, kind: TargetKind, teacher: torch.Tensor | None, recipe: Recipe) -> torch.Tensor:
    """The loss `finetune` minimises on a minibatch: the target kind's (`losses.loss_for`, the loss
    `evaluate` reports); with a teacher's outputs, `(1 - a) * task + a * distill`,
    `a = recipe.distill_weight` (`losses.distill_loss`)."""
    task = loss_for(kind)(out, y)
    if teacher is None:
        return task
    w = recipe.distill_weight
    return (1 - w) * task + w * distill_loss(out, teacher, kind, recipe.temperature)


def _check_fits(model: nn.Module, train: Dataset, val: Dataset, teacher: nn.Module | None, device: str) -> None:
    """Fail before training when the data, the model and the teacher do not go together."""
    if train.target_kind != val.target_kind:
        raise UserError(f"the training data has {train.target_kind} targets but the validation data {val.target_kind}; they must be of one kind.")
    model.eval()
    with torch.no_grad():
        x, y = train.x[:2].to(device), train.y[:2].to(device)
        out = model_output(model, x)
        train.targets(out, y)  # raises when the targets do not fit the output
        if teacher is not None and model_output(teacher, x).shape != out.shape:
            raise UserError(f"the teacher's outputs have shape {tuple(model_output(teacher, x).shape[1:])} but the model's {tuple(out.shape[1:])}; they must match.")


def _set_train_mode(model: nn.Module, batch_norm: BatchNormMode) -> None:
    model.train()
    if batch_norm == "frozen":  # normalise with the running statistics and leave them as they are
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _validate(model: nn.Module, val: Dataset, device: str) -> float | None:
    value = metric(val, outputs(model, val, device))
    return finite(value)


def _better(value: float | None, best: float | None) -> bool:
    return value is not None and (best is None or value > best)


def finetune(
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    *,
    recipe: Recipe | None = None,
    teacher: nn.Module | None = None,
    device: str = "cpu",
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> tuple[nn.Module, FinetuneReport]:
    """Train the parameters that are not fixed (or all, `recipe.train="all"`); keep the best epoch.

    Minibatches of `train.batch_size` samples come in a seeded order. The loss follows the
    target kind (`batch_loss`); with a `teacher`, `(1 - a) * task + a * distill` with
    `a = recipe.distill_weight`. After every epoch the validation metric (accuracy, AUC or Dice,
    `measure.metric`) is measured; the model ends with the weights of the best epoch, the model
    as given counting as epoch 0. The global RNG is left as it was (dropout and stochastic depth
    draw from it inside a forked, seeded state). Under an initialised process group (torchrun)
    each process trains on its shard of every global minibatch through DistributedDataParallel.
    `model` is changed in place, returned in eval mode.
    """
    recipe = recipe or Recipe()
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    _check_fits(model, train, val, teacher, device)
    choice = choose_trainable(model, recipe.train)  # docs/method.md §4: what is left to learn decides
    goal = _validate(teacher, val, device) if choice.option == "auto" and teacher is not None else None
    report = _in_forms(model, choice, train, val, recipe, teacher, device, on_epoch, goal)
    model.eval()
    return model, report


@dataclass(frozen=True)
class _Handover:
    """Where a form's fine-tune may hand over to the next form: after epoch `at`, when its best
    metric on the validation data is more than `ESCALATION_GAP` below the teacher's `goal`."""

    at: int
    goal: float | None

    def due(self, epoch: int, best: float | None) -> bool:
        return epoch == self.at and escalates(self.goal, best)


def _in_forms(
    model: nn.Module,
    choice: TrainableChoice,
    train: Dataset,
    val: Dataset,
    recipe: Recipe,
    teacher: nn.Module | None,
    device: str,
    on_epoch: Callable[[EpochRecord], None] | None,
    goal: float | None,
) -> FinetuneReport:
    """`recipe.epochs` epochs of the form `choice`; with a teacher's `goal` (`--train auto`), a form
    that is still more than `ESCALATION_GAP` short of it halfway through its epochs hands the rest
    over to the next form (`next_form`: fixed → masked → all), from its best weights (docs/method.md §4).
    The epochs in all stay `recipe.epochs`; the best epoch of all is kept."""
    teacher_params = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    report: FinetuneReport | None = None
    left, started = recipe.epochs, time.perf_counter()
    phase_recipe = recipe
    while True:
        smaller = sum(p.numel() for p in model.parameters()) < teacher_params
        then = next_form(model, choice.mode, smaller_than_teacher=smaller) if goal is not None and left >= 2 else None
        handover = _Handover(left // 2, goal) if then is not None else None
        done = 0 if report is None else report.epochs
        phase, handed = _train_as(model, choice, train, val, replace(phase_recipe, epochs=left), teacher, device, _shifted(on_epoch, done), handover)
        report = phase if report is None else _continued(report, phase)
        if done and phase.best_epoch == 0:
            report.trainable_reason += "; they did not beat it, so that model is kept"
        last = phase.history[-1]
        if handed and _out_of_time(started, last.seconds + last.val_seconds, recipe.max_minutes, rank_and_world()[1]):
            report.stopped_early, handed = True, False  # --max-minutes bounds the whole fine-tune, every form together
        if not handed or then is None:
            report.recipe = recipe.to_json()
            return report
        if recipe.max_minutes is not None:  # what is left of the budget
            phase_recipe = replace(recipe, max_minutes=recipe.max_minutes - (time.perf_counter() - started) / 60)
        report.trainable_reason = (
            f"{report.trainable_reason}; after {phase.epochs} epochs that was at {phase.metric_after:.3f} on the validation data, more than "
            f"{ESCALATION_GAP:g} below the teacher's {goal:.3f}, so the other {left - phase.epochs} epochs train {FORM_IN_WORDS[then]}"
        )
        left -= phase.epochs
        choice = choose_trainable(model, then)


def _train_as(
    model: nn.Module,
    choice: TrainableChoice,
    train: Dataset,
    val: Dataset,
    recipe: Recipe,
    teacher: nn.Module | None,
    device: str,
    on_epoch: Callable[[EpochRecord], None] | None,
    handover: _Handover | None = None,
) -> tuple[FinetuneReport, bool]:
    """`_train` the parameters `choice` says, with the narrowings of a fixed network; and whether it handed over."""
    with trained_in([model, teacher], channels_last(recipe.memory_format, device)), trained_as(model, choice) as params:
        if not params:
            raise UserError("every parameter of the model is fixed, so there is nothing to train; train all of them instead.")
        # fixed convolutions skip all-zero input slices, and what feeds only zero depthwise kernels is not computed
        with torch.random.fork_rng(devices=[]), reading_used_inputs(model), skipping_unread_channels(model):
            torch.manual_seed(recipe.seed)
            report, handed = _train(model, params, train, val, recipe, teacher, device, on_epoch, handover)
    report.trainable, report.trainable_reason = choice.mode, choice.reason
    return report, handed


def _shifted(on_epoch: Callable[[EpochRecord], None] | None, offset: int) -> Callable[[EpochRecord], None] | None:
    """`on_epoch` for a continued fine-tune: its epochs numbered after the first one's."""
    if on_epoch is None:
        return None
    return lambda r: on_epoch(replace(r, epoch=r.epoch + offset))


def _continued(first: FinetuneReport, second: FinetuneReport) -> FinetuneReport:
    """One report for a fine-tune continued by another from the first one's best weights: epochs
    numbered on, the best epoch of both (the second's epoch 0 is the first's best)."""
    history = [*first.history, *(replace(r, epoch=r.epoch + first.epochs) for r in second.history)]
    best_epoch = first.best_epoch if second.best_epoch == 0 else second.best_epoch + first.epochs
    return replace(
        second, metric_before=first.metric_before, best_epoch=best_epoch, epochs=first.epochs + second.epochs, history=history,
        seconds_per_epoch=round(sum(r.seconds for r in history) / len(history), 4) if history else 0.0,
        stopped_early=first.stopped_early or second.stopped_early,
        trainable_params=first.trainable_params if second.best_epoch == 0 else second.trainable_params,
        trainable=first.trainable if second.best_epoch == 0 else second.trainable, trainable_reason=first.trainable_reason,
    )  # fmt: skip


@dataclass
class _Loop:
    """What every minibatch of `_train` uses."""

    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper under torchrun
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    gates: ClassGates | None
    precision: Precision
    teacher: nn.Module | None
    recipe: Recipe
    rank: int
    world: int
    device: str
    last: bool  # minibatches channels-last (training.layout)


def _loop(model: nn.Module, params: list[nn.Parameter], train: Dataset, recipe: Recipe, teacher: nn.Module | None, device: str) -> _Loop:
    """The optimiser over `params`, its cosine schedule over every step, and the gates if asked for."""
    rank, world = rank_and_world()
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    optimizer = optimizer_for(parameter_groups(model, params, recipe), recipe)
    gates = _class_gates(model, train.x[:1].to(device), train.target_kind, world) if recipe.class_gates else None
    steps = max(1, recipe.epochs * math.ceil(train.num_samples / train.batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return _Loop(model, net, optimizer, schedule, gates, Precision(recipe.amp, device), teacher, recipe, rank, world, device, channels_last(recipe.memory_format, device))


def _train(
    model: nn.Module,
    params: list[nn.Parameter],
    train: Dataset,
    val: Dataset,
    recipe: Recipe,
    teacher: nn.Module | None,
    device: str,
    on_epoch: Callable[[EpochRecord], None] | None,
    handover: _Handover | None = None,
) -> tuple[FinetuneReport, bool]:
    """`recipe.epochs` epochs (fewer when out of time, or when `handover` is due), each followed by
    validation; the model ends with the best epoch's weights. Returns whether it handed over."""
    loop = _loop(model, params, train, recipe, teacher, device)
    generator = torch.Generator().manual_seed(recipe.seed)
    before = _validate(model, val, device)
    best, best_epoch = before, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history: list[EpochRecord] = []
    started, stopped, handed = time.perf_counter(), False, False
    for epoch in range(1, recipe.epochs + 1):
        if history and _out_of_time(started, history[-1].seconds + history[-1].val_seconds, recipe.max_minutes, loop.world):
            stopped = True
            break
        record = _epoch(loop, train, val, epoch, generator)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if _better(record.metric, best):
            best, best_epoch = record.metric, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if handover is not None and handover.due(epoch, best):
            handed = True
            break
    model.load_state_dict(best_state)
    return FinetuneReport(
        metric=val.metric_name,
        metric_before=before,
        metric_after=best,
        best_epoch=best_epoch,
        epochs=len(history),
        seconds_per_epoch=round(sum(r.seconds for r in history) / len(history), 4) if history else 0.0,
        trainable_params=sum(p.numel() for p in params),
        params=sum(p.numel() for p in model.parameters()),
        stopped_early=stopped,
        processes=loop.world,
        recipe=recipe.to_json(),
        history=history,
    ), handed


def _epoch(loop: _Loop, train: Dataset, val: Dataset, epoch: int, generator: torch.Generator) -> EpochRecord:
    """One pass over `train` in a seeded order (gated after the paper's schedule), then validation."""
    t0 = time.perf_counter()
    _set_train_mode(loop.model, loop.recipe.batch_norm)
    order = torch.randperm(train.num_samples, generator=generator)
    gated = loop.gates is not None and uses_gates(epoch - 1)
    total, seen = 0.0, 0
    # each process reads a contiguous shard of every global minibatch (augmented: io/augment); its
    # loss is its share of the minibatch's mean; one too small for batch norm is skipped
    for batch, x_shard, y_shard in train.shuffled(order, loop.world, loop.rank, seed=loop.recipe.seed * 10_007 + epoch):
        x, y = as_input(x_shard.to(loop.device, non_blocking=True), loop.last), y_shard.to(loop.device, non_blocking=True)
        loss = _step(loop, x, y, train.target_kind, gated, len(x) * loop.world / len(batch))
        total, seen = total + loss * len(x), seen + len(x)
    seconds = time.perf_counter() - t0
    if loop.world > 1:  # running statistics were updated on each process's shard: take process 0's, as DDP's next forward would
        _broadcast_buffers(loop.model)
    t1 = time.perf_counter()
    value = _validate(loop.model, val, loop.device)
    return EpochRecord(epoch, _mean_loss(total, seen, loop.world), value, round(seconds, 4), round(time.perf_counter() - t1, 4))


def _step(loop: _Loop, x: torch.Tensor, y: torch.Tensor, kind: TargetKind, gated: bool, scale: float) -> float:
    """One minibatch (this process's shard of it) through `class_gated_step`, the one training
    step; returns its `batch_loss` (without the gate's penalty)."""
    soft = None
    if loop.teacher is not None:
        with torch.no_grad(), loop.precision.autocast():
            soft = model_output(loop.teacher, x)
    losses: list[float] = []

    def objective(out: torch.Tensor) -> torch.Tensor:
        value = batch_loss(out, y, kind, soft, loop.recipe)
        losses.append(float(value.detach()))
        return value * scale  # DistributedDataParallel averages gradients over processes: scale so they add up

    class_gated_step(loop.net, loop.gates, x, y, loop.optimizer, gated, loop.recipe.gate_sparsity, loop.recipe.gate_lr, objective, loop.precision)
    loop.schedule.step()
    return losses[0]


def _broadcast_buffers(model: nn.Module) -> None:
    """Process 0's buffers (batch-norm running statistics) everywhere, so every process validates,
    chooses the best epoch of, and ends with the same model; a search that fine-tunes its probes
    (`sweep.prune_to_target`) then takes the same path in every process."""
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def _class_gates(model: nn.Module, example: torch.Tensor, kind: str, world: int) -> ClassGates:
    """The gate of class-specific gate training (`classes.ClassGates`); it lives only while training,
    so the model written afterwards keeps its architecture."""
    if kind != "labels":
        raise UserError("class gates need class labels: each sample passes its own class's gates.")
    if world > 1:
        raise UserError("class gates are not supported under torchrun yet; train them in one process.")
    return ClassGates.for_model(model, example)


def _mean_loss(total: float, seen: int, world: int) -> float:
    """The epoch's mean per-sample loss over every process."""
    if world > 1:
        import torch.distributed as dist

        both = torch.tensor([total, float(seen)], dtype=torch.float64)
        dist.all_reduce(both)
        total, seen = float(both[0]), int(both[1])
    return round(total / max(seen, 1), 6)


def _out_of_time(started: float, last_epoch: float, max_minutes: float | None, world: int) -> bool:
    """Would another epoch end past the budget? Process 0 decides for all, so they stop together."""
    if max_minutes is None:
        return False
    stop = torch.tensor([float(time.perf_counter() - started + last_epoch > max_minutes * 60)])
    if world > 1:
        import torch.distributed as dist

        dist.broadcast(stop, src=0)
    return bool(stop.item())


def finetune_file(
    loaded: LoadedModel,
    train: Dataset,
    val: Dataset,
    out: str | Path,
    *,
    recipe: Recipe | None = None,
    teacher: nn.Module | None = None,
    device: str = "cpu",
    on_epoch: Callable[[EpochRecord], None] | None = None,
    force: bool = False,
    teacher_file: str | None = None,
) -> FinetuneReport:
    """`finetune` a loaded model and write it to `out` with the step in its history (process 0 only).

    The file keeps the (pruned) architecture and the fixed flags, so `load_model` rebuilds it;
    `teacher_file` names the teacher's file in that step (None: no teacher, or not from a file).
    """
    check_target(Path(out), force)
    model, report = finetune(loaded.model, train, val, recipe=recipe, teacher=teacher, device=device, on_epoch=on_epoch)
    report.out = str(out)
    if rank_and_world()[0] == 0:
        step = {**report.history_step(), "teacher": teacher_file if teacher is not None else None}
        save_model(model, out, arch=loaded.arch, history=[*loaded.history, step], report=step, preprocessing=train.preprocessing or loaded.preprocessing, force=force)
    return report
