"""Handlers of the training loop (``training/loop.py``), one job each: stop after N steps,
the learning-rate schedule, the resumable state, the CSV and TensorBoard logs, the progress
bar, and what the checkpoint needs at the end (BatchNorm statistics on whole slices, the
internal-evaluation L1, the OOD calibration)."""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import synthesis

from .dataset import SliceCache
from .loop import Handler, Loop, LoopState


class StepLimit(Handler):
    """Stops the loop after ``max_steps`` optimization steps (None: never)."""

    def __init__(self, max_steps: int | None) -> None:
        self.max_steps = max_steps

    def iteration_completed(self, loop: Loop) -> None:
        if self.max_steps is not None and loop.state.step >= self.max_steps:
            loop.state.stop = True


def learning_rate_factor(epochs: int, decay_epochs: int, epoch: int) -> float:
    """1 until the last ``decay_epochs`` epochs, then linearly down (never 0: the last epoch
    still learns), as pix2pix schedules it (its n_epochs_decay); ``epoch`` counts from 1."""
    first_decay = epochs - decay_epochs + 1
    if decay_epochs <= 0 or epoch < first_decay:
        return 1.0
    return (epochs - epoch + 1) / (decay_epochs + 1)


class LearningRateSchedule(Handler):
    """Every optimizer's learning rate follows :func:`learning_rate_factor` through
    ``torch.optim.lr_scheduler.LambdaLR``, stepped at the end of each epoch; the schedulers'
    state travels in the resumable state (``schedulers``)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], epochs: int,
                 decay_epochs: int) -> None:
        self.schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda done: learning_rate_factor(epochs, decay_epochs, done + 1))
            for name, optimizer in optimizers.items()}

    def epoch_completed(self, loop: Loop) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in self.schedulers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state[name])


class CSVLog(Handler):
    """``training_log.csv``: one row per step (step, epoch, losses, seconds of training); a
    resumed run first drops the rows written after the state it resumes from and counts its
    seconds on from that state's row (``offset``), so the last row holds the whole training
    time of the run however often it was interrupted."""

    def __init__(self, path: Path, losses: Sequence[str], clock_start: float) -> None:
        self.path, self.losses, self.clock_start = path, tuple(losses), clock_start
        self.handle: Any = None
        #: seconds the run had trained before this process resumed it
        self.offset = 0.0

    def elapsed(self) -> float:
        """Seconds of training so far, interrupted runs included."""
        return self.offset + time.perf_counter() - self.clock_start

    def started_at(self, step: int) -> None:
        """Open the log for a run that continues after ``step`` (0: a fresh run)."""
        if step == 0:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            with open(self.path, newline="") as handle:
                rows = list(csv.reader(handle))
            kept = [r for r in rows[1:] if int(r[0]) <= step]
            with open(self.path, "w", newline="") as handle:
                csv.writer(handle).writerows([rows[0], *kept] if rows else [])
            if kept:
                self.offset = float(kept[-1][-1])
        fresh = not self.path.exists()
        self.handle = open(self.path, "a", newline="")  # noqa: SIM115 - closed at completion
        if fresh:
            csv.writer(self.handle).writerow(["step", "epoch", *self.losses, "seconds"])

    def started(self, loop: Loop) -> None:
        self.started_at(loop.state.step)

    def iteration_completed(self, loop: Loop) -> None:
        state = loop.state
        csv.writer(self.handle).writerow(
            [state.step, state.epoch, *(round(state.losses[k], 6) for k in self.losses),
             round(self.elapsed(), 2)])

    def flush(self) -> None:
        if self.handle is not None:
            self.handle.flush()

    def completed(self, loop: Loop) -> None:
        if self.handle is not None:
            self.handle.close()


class TensorBoard(Handler):
    """TensorBoard scalars (``tensorboard --logdir RUN/tensorboard``): the losses per step and
    the internal-evaluation L1 at the end; events after the resumed step are dropped."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer: Any = None

    def started(self, loop: Loop) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is in the training extra
            from config import InputError

            raise InputError("TensorBoard logging needs the tensorboard package",
                             hint="pip install 'vcemri[training]'") from None
        self.writer = SummaryWriter(str(self.folder), purge_step=loop.state.step + 1)

    def iteration_completed(self, loop: Loop) -> None:
        for name, value in loop.state.losses.items():
            self.writer.add_scalar(f"train/{name}", value, loop.state.step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def completed(self, loop: Loop) -> None:
        self.writer.close()


class Progress(Handler):
    """Calls ``report("step", {"epoch": ..., losses...})`` after every step (the CLI's bar)."""

    def __init__(self, report: Callable[[str, dict[str, Any]], None]) -> None:
        self.report = report

    def iteration_completed(self, loop: Loop) -> None:
        self.report("step", {"epoch": loop.state.epoch, **loop.state.losses})


class StateSaver(Handler):
    """The resumable training state (models, optimizers, loss scalers, schedulers, the loop's
    position and the options that must not change) every ``every`` steps and when the loop is
    stopped early, written atomically (temporary file, then rename). ``log`` is flushed first,
    so the log never holds fewer rows than the state claims."""

    def __init__(self, path: Path, modules: dict[str, Any], every: int | None,
                 options: dict[str, Any], log: CSVLog | None = None,
                 schedule: LearningRateSchedule | None = None) -> None:
        self.path, self.modules, self.every, self.options = path, modules, every, options
        self.log, self.schedule = log, schedule

    def iteration_completed(self, loop: Loop) -> None:
        state = loop.state
        if state.stop or (self.every and state.step % self.every == 0):
            self.save(state)

    def save(self, state: LoopState) -> None:
        if self.log is not None:
            self.log.flush()
        content = {name: module.state_dict() for name, module in self.modules.items()}
        if self.schedule is not None:
            content["schedulers"] = self.schedule.state_dict()
        content.update(state.position(), options=self.options)
        temporary = self.path.with_name(self.path.name + ".tmp")
        torch.save(content, temporary)
        os.replace(temporary, self.path)

    def restore(self, device: torch.device) -> LoopState | None:
        """The loop state to resume from (models etc. loaded), or None without a state file;
        raises :class:`config.InputError` when it was written with other options."""
        from config import InputError

        if not self.path.is_file():
            return None
        content = torch.load(self.path, map_location=device, weights_only=True)
        if content.get("options") != self.options:
            raise InputError(f"{self.path} was written with other training options; "
                             "resume with the same options or start a new run")
        for name, module in self.modules.items():
            if name in content:
                module.load_state_dict(content[name])
        if self.schedule is not None and "schedulers" in content:
            self.schedule.load_state_dict(content["schedulers"])
        return LoopState(step=content["step"], epoch=content["epoch"], batch=content["batch"])


class BatchNormRecalibration(Handler):
    """After training on crops: the BatchNorm running statistics recomputed exactly (a
    cumulative average, no momentum, ``torch.optim.swa_utils.update_bn``) over the batches
    ``slices`` gives, which the trainer makes one epoch of the training crops
    (``EpochData.statistics_batches``). In eval mode a layer must normalise as it did while
    the next one learnt, with crop batches' statistics; whole slices' (what this handler took
    until ``vcemri recalibrate`` existed, since inference sees whole slices) shifted every
    layer and nearly doubled the shipped model's internal L1, though on unseen protocols they
    kept more of the tumour (README "BatchNorm statistics from crops"). update_bn resets
    every BatchNorm of the module it is given, so the passes include the confidence module's
    error head (``aux``), which a plain forward pass skips: otherwise its statistics would be
    left at their defaults (mean 0, variance 1) and its expected errors wrong."""

    def __init__(self, generator: torch.nn.Module, slices: Callable[[], Any],
                 device: torch.device) -> None:
        self.generator, self.slices, self.device = generator, slices, device

    def completed(self, loop: Loop) -> None:
        every_layer = (_WithAux(self.generator)
                       if getattr(self.generator, "error_head", None) is not None
                       else self.generator)
        torch.optim.swa_utils.update_bn(self.slices(), every_layer, self.device)
        self.generator.eval()


class _WithAux(torch.nn.Module):
    """A generator whose forward pass runs its auxiliary outputs too."""

    def __init__(self, generator: torch.nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> Any:
        return self.generator(x, aux=True)


def internal_l1(generator: torch.nn.Module, cache: SliceCache, rows: np.ndarray,
                device: torch.device, channels: list[int]) -> tuple[float, float]:
    """Mean absolute error (normalized units) inside the head of the model and of
    'VCE = T1w' (outside it the pipeline writes 0 for both)."""
    if len(rows) == 0:
        return float("nan"), float("nan")
    model, copy, count = 0.0, 0.0, 0
    generator.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), 8):
            part = rows[start:start + 8]
            x = torch.from_numpy(np.asarray(cache.inputs[part], np.float32)).to(device)
            y = torch.from_numpy(np.asarray(cache.targets[part], np.float32)).to(device)
            # the cleaned background is each slice's lowest normalized value
            head = x[:, 0] > x[:, 0].amin(dim=(1, 2), keepdim=True) + 1e-3
            model += float(((generator(x[:, channels])[:, 0] - y).abs() * head).sum())
            copy += float(((x[:, 0] - y).abs() * head).sum())
            count += int(head.sum())
    return model / max(count, 1), copy / max(count, 1)


class InternalEvaluation(Handler):
    """At the end: the internal patients' L1 of the model and of 'VCE = T1w' (``metrics``),
    also written to TensorBoard."""

    def __init__(self, generator: torch.nn.Module, cache: SliceCache, rows: np.ndarray,
                 device: torch.device, channels: list[int],
                 board: TensorBoard | None = None) -> None:
        self.generator, self.cache, self.rows = generator, cache, rows
        self.device, self.channels, self.board = device, channels, board
        self.metrics: dict[str, float] = {}

    def completed(self, loop: Loop) -> None:
        model, copy = internal_l1(self.generator, self.cache, self.rows, self.device,
                                  self.channels)
        self.metrics = {"internal_l1_normalized": round(model, 5),
                        "internal_l1_t1w_copy_normalized": round(copy, 5)}
        if self.board is not None:
            self.board.scalars({"internal/l1_normalized": model,
                                "internal/l1_t1w_copy_normalized": copy}, loop.state.step)


class FitnessTraining(Handler):
    """At the end: the fitness classifier (training/fitness.py), trained on the training
    patients' slices against faults made from them and calibrated on the internal ones."""

    def __init__(self, cache: SliceCache, train: Sequence[str], internal: Sequence[str],
                 device: torch.device, steps: int, seed: int) -> None:
        self.cache, self.train, self.internal = cache, list(train), list(internal)
        self.device, self.steps, self.seed = device, steps, seed
        self.result: Any = None

    def completed(self, loop: Loop) -> None:
        from .fitness import FitnessOptions, train_fitness

        self.result = train_fitness(self.cache, self.train, self.internal, self.device,
                                    FitnessOptions(steps=self.steps, seed=self.seed))


class OODCalibration(Handler):
    """At the end: the OOD screening calibration (``synthesis.calibrate_ood``) from the
    pooled features of ``layer`` on every training patient (empty for models without it)."""

    def __init__(self, generator: torch.nn.Module, layer: str | None, cache: SliceCache,
                 patients: Sequence[str], device: torch.device, channels: list[int]) -> None:
        self.generator, self.layer, self.cache = generator, layer, cache
        self.patients, self.device, self.channels = list(patients), device, channels
        self.calibration = synthesis.OODCalibration()

    def completed(self, loop: Loop) -> None:
        if self.layer is None:
            return
        self.generator.eval()
        vectors = []
        for patient in self.patients:
            rows = self.cache.rows({patient})
            probe = synthesis.FeatureProbe(self.generator, self.layer)
            try:
                with torch.inference_mode():
                    for start in range(0, len(rows), 8):
                        batch = np.asarray(self.cache.inputs[rows[start:start + 8]], np.float32)
                        self.generator(torch.from_numpy(batch[:, self.channels]).to(self.device))
                vectors.append(probe.study_vector())
            finally:
                probe.close()
        self.calibration = synthesis.calibrate_ood(vectors, self.layer)
