"""The training loop: epochs of batches through an objective, with handlers called at its
events (MONAI's engine + handlers: the loop stays short, checkpointing, logging, schedules and
calibration live in ``training/handlers.py``).

Batches come from ``torch.utils.data.DistributedSampler`` (``set_epoch`` each epoch): every
process of a ``torchrun`` job takes its share of the same permutation, which depends only on
the seed and the epoch, so a resumed run sees exactly the batches an uninterrupted one would,
and the union of the ranks' batches is the single-process batch of the same global size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from config import InputError

from .augmentation import Augmentation
from .dataset import SliceCache
from .painting import Painter


@dataclass
class LoopState:
    """Where the loop is: the step count, the epoch, the next batch of that epoch, the last
    step's losses, and whether a handler asked it to stop."""

    step: int = 0
    epoch: int = 1
    batch: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    stop: bool = False

    def position(self) -> dict[str, int]:
        """The next batch to run, as a resumable state file keeps it."""
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch}


class Handler:
    """A training-loop event handler; override the events you need. Handlers run in the
    order given, so one that asks to stop runs before one that saves."""

    def started(self, loop: Loop) -> None:
        """Before the first batch (after a resumed state is loaded)."""

    def epoch_started(self, loop: Loop) -> None:
        """Before the first batch of ``loop.state.epoch``."""

    def iteration_completed(self, loop: Loop) -> None:
        """After each optimization step (``loop.state.losses`` holds its losses)."""

    def epoch_completed(self, loop: Loop) -> None:
        """After the last batch of an epoch that ran to its end."""

    def completed(self, loop: Loop) -> None:
        """After the last step (every epoch done, or a handler stopped the loop)."""


class EpochData:
    """The batches of an epoch for this process: slices of the cache, lesions repainted by a
    CG-SAMR painter (``training/painting.py``), crops, augmentation
    (``training/augmentation.py``; the unpaired CE-T1w slices are not augmented), and
    (CycleGAN) CE-T1w slices of an independent permutation."""

    def __init__(self, cache: SliceCache, rows: np.ndarray, *, batch_size: int, seed: int,
                 rank: int, world: int, crop: tuple[int, int] | None, unpaired: bool,
                 device: torch.device, parts: int = 1,
                 augmentation: Augmentation | None = None,
                 painter: Painter | None = None) -> None:
        if batch_size % (world * parts):
            raise InputError(f"--batch-size {batch_size} (the global batch) must be a multiple "
                             f"of the {world} process(es) times {parts} micro-batch(es)")
        self.cache, self.rows = cache, np.asarray(rows)
        self.local_batch, self.parts = batch_size // world, parts
        self.seed, self.crop, self.unpaired, self.device = seed, crop, unpaired, device
        self.augmentation, self.painter = augmentation, painter
        self.samplers = [DistributedSampler(range(len(self.rows)), num_replicas=world,
                                            rank=rank, shuffle=True, seed=seed + k,
                                            drop_last=True)
                         for k in range(2 if unpaired else 1)]

    def _batches(self, sampler: DistributedSampler, epoch: int) -> list[np.ndarray]:
        """This process's batches: consecutive runs of its share of the permutation, each
        sorted (memory-mapped reads in file order); with micro-batches, part k of a batch
        holds every ``parts``-th slice from the k-th, as the rank it stands for would."""
        sampler.set_epoch(epoch)
        order = self.rows[np.fromiter(iter(sampler), int)]
        size = self.local_batch
        return [np.concatenate([np.sort(order[i:i + size][k::self.parts])
                                for k in range(self.parts)])
                for i in range(0, len(order), size)]

    def _window(self, epoch: int, index: int) -> tuple[slice, slice]:
        """The batch's crop: offsets that depend only on the seed, epoch and batch."""
        shape = self.cache.targets.shape[1:]
        if self.crop is None:
            return slice(None), slice(None)
        rows, cols = min(self.crop[0], shape[0]), min(self.crop[1], shape[1])
        rng = np.random.default_rng([self.seed, epoch, index, 7])
        top = int(rng.integers(0, shape[0] - rows + 1))
        left = int(rng.integers(0, shape[1] - cols + 1))
        return slice(top, top + rows), slice(left, left + cols)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(array, np.float32)).to(self.device)

    def epoch(self, epoch: int, first: int = 0) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(batch index, (inputs, targets, unpaired targets or None)) from batch ``first``."""
        parts = [self._batches(sampler, epoch) for sampler in self.samplers]
        for index in range(first, len(parts[0])):
            top, left = self._window(epoch, index)
            rows = parts[0][index]
            inputs, targets = self.cache.inputs[rows], self.cache.targets[rows]
            if self.painter is not None:  # on whole slices: a lesion may lie across the crop
                inputs, targets, _ = self.painter.batch(
                    rows, np.asarray(inputs, np.float32), np.asarray(targets, np.float32), epoch)
            inputs = np.asarray(inputs[..., top, left], np.float32)
            targets = np.asarray(targets[:, top, left], np.float32)
            if self.augmentation is not None:
                inputs, targets = self.augmentation.batch(inputs, targets,
                                                          [(epoch, row) for row in rows])
            x, y = self._tensor(inputs), self._tensor(targets)[:, None]
            apart = (self._tensor(self.cache.targets[parts[1][index]][:, top, left])[:, None]
                     if self.unpaired else None)
            yield index, (x, y, apart)

    def statistics_batches(self, channels: Sequence[int]) -> Iterator[torch.Tensor]:
        """One epoch's inputs (the channels a generator takes) as the network trained on
        them: epoch 0's batches, each with its crop window (whole slices without a crop), each
        micro-batch part apart, no augmentation: what the BatchNorm statistics are recomputed
        over after training (handlers.BatchNormRecalibration)."""
        size = self.local_batch // self.parts
        for index, rows in enumerate(self._batches(self.samplers[0], 0)):
            top, left = self._window(0, index)
            inputs = np.asarray(self.cache.inputs[rows], np.float32)[:, list(channels)]
            inputs = inputs[..., top, left]
            for k in range(self.parts):
                yield self._tensor(inputs[k * size:(k + 1) * size])


class Loop:
    """Runs ``objective.step`` over ``data``'s epochs, firing ``handlers``' events."""

    def __init__(self, objective: Any, data: EpochData, handlers: Sequence[Handler],
                 epochs: int, state: LoopState | None = None) -> None:
        self.objective, self.data, self.handlers = objective, data, list(handlers)
        self.epochs = epochs
        self.state = state or LoopState()

    def _fire(self, event: str) -> None:
        for handler in self.handlers:
            getattr(handler, event)(self)

    def run(self) -> LoopState:
        state = self._state = self.state
        self._fire("started")
        while state.epoch <= self.epochs and not state.stop:
            self._fire("epoch_started")
            for index, batch in self.data.epoch(state.epoch, state.batch):
                values = self.objective.step(*batch)
                state.step, state.batch = state.step + 1, index + 1
                state.losses = dict(zip(self.objective.losses, self._reduce(values)))
                self._fire("iteration_completed")
                if state.stop:
                    break
            else:
                self._fire("epoch_completed")
                state.epoch, state.batch = state.epoch + 1, 0
        self._fire("completed")
        return state

    def _reduce(self, losses: torch.Tensor) -> list[float]:
        """The step's losses averaged over the processes of a distributed run."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(losses)
            losses = losses / torch.distributed.get_world_size()
        return [float(v) for v in losses]
