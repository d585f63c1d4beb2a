"""Recompute a trained model's BatchNorm statistics on the inputs it was trained on
(``vcemri recalibrate``), and what depends on them: the OOD calibration and the internal L1.

A network trained on crops normalises each layer with the statistics of crop batches; in eval
mode it normalises with running statistics instead, and those must describe the same crop
batches, or every layer is shifted from what the next one learnt to expect. Until this module
the trainer recomputed them on whole slices (the reasoning was that inference sees whole
slices), which moves them far from the crops': the shipped model's internal L1 inside the
head is 0.125 (normalised units; 'VCE = T1w' 0.155) with whole-slice statistics and 0.071
with its training crops' (``vcemri recalibrate --model builtin``, README "BatchNorm
statistics from crops", which also shows what it costs: on unseen protocols the whole-slice
statistics kept more of the tumour). The trainer now recomputes them on crops
(``EpochData.statistics_batches``); this command does the same for a checkpoint trained
before, on its own training patients (recomputed from the seed and institutions it records),
with the crop it records (or ``crop``).

Only BatchNorm buffers change; then the OOD distance (decoder features change with them) is
recalibrated and the internal patients' L1 measured again. The fitness classifier, which
reads the inputs alone, and the error head's weights are kept: refit the head afterwards
(``vcemri refit-confidence``) where its confidence matters. With ``fitness_steps`` the fitness
classifier is trained here, as the trainer would have (``training/fitness.py``: the same
patients, faults and calibration), for a model trained without one (``--fitness-steps 0``,
e.g. a fine-tune), or in place of the one it has.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import synthesis
from config import InputError

from .dataset import prepare, read_manifest
from .handlers import (
    BatchNormRecalibration,
    FitnessTraining,
    InternalEvaluation,
    OODCalibration,
    internal_l1,
)
from .loop import EpochData
from .trainer import DECODER_PROBE, recorded_design, save_split


@dataclass(frozen=True)
class RecalibrationResult:
    """The recalibrated checkpoint and its internal L1 (normalised units) before and after."""

    checkpoint: Path
    patients: int
    batches: int
    seconds: float
    l1_before: float
    l1_after: float
    l1_t1w_copy: float
    #: the fitness classifier trained here (None: the model's own, or none, kept)
    fitness: synthesis.FitnessMeta | None = None


def recalibrate(model: str | Path, manifest: Path, out: Path,
                crop: tuple[int, int] | None = None, device: str = "auto",
                command: str | None = None, fitness_steps: int = 0) -> RecalibrationResult:
    """``model``'s BatchNorm statistics recomputed on crops of its training patients in
    ``manifest``; written to ``out/model.safetensors`` (the cache goes to ``out/cache``).
    ``fitness_steps`` > 0 also trains its fitness classifier for that many steps."""
    started, out = time.perf_counter(), Path(out)
    checkpoint = synthesis.load_checkpoint(synthesis.resolve_checkpoint(model))
    meta = checkpoint.meta
    options = meta.training.get("options") or {}
    crop = crop or (tuple(options["crop"]) if options.get("crop") else None)  # type: ignore[assignment]
    if crop is None:
        raise InputError(f"{model} records no training crop: it was trained on whole slices, "
                         "whose statistics training already left; give --crop to use one")
    entries = read_manifest(Path(manifest))
    split = recorded_design(meta.training, [(e.patient, e.institution) for e in entries])
    used = set(split["train"]) | set(split["internal"])
    save_split(split, out)
    stored = meta.normalization
    cache = prepare([e for e in entries if e.patient in used], out / "cache",
                    synthesis.Normalization(stored.method, stored.level),
                    dataset={role: synthesis.Statistics(**stats.model_dump())
                             for role, stats in stored.dataset_statistics.items()} or None,
                    grid=synthesis.GridPolicy(*meta.model_grid, meta.model_spacing_mm))
    missing = sorted(set(split["train"]) - {p.patient for p in cache.patients})
    if missing:
        raise InputError(f"the manifest lacks {len(missing)} of the model's training patients "
                         f"({', '.join(missing[:5])}): give the cohort it was trained on")
    torch_device = synthesis.inference_device(device)
    generator = checkpoint.generator.to(torch_device).eval()
    channels = [cache.roles.index(m) for m in getattr(generator, "inputs", ("t1w", "t2w"))]
    internal_rows = cache.rows(set(split["internal"]))
    before, copy = internal_l1(generator, cache, internal_rows, torch_device, channels)
    data = EpochData(cache, cache.rows(set(split["train"])),
                     batch_size=int(options.get("batch_size", 4)),
                     seed=int(options.get("seed", 0)), rank=0, world=1, crop=crop,
                     unpaired=False, device=torch_device,
                     parts=int(options.get("micro_batches", 1)))
    seen: list[int] = []

    def counted() -> Iterator[torch.Tensor]:
        for batch in data.statistics_batches(channels):
            seen.append(len(batch))
            yield batch

    BatchNormRecalibration(generator, counted, torch_device).completed(None)  # type: ignore[arg-type]
    batches = len(seen)
    evaluation = InternalEvaluation(generator, cache, internal_rows, torch_device, channels)
    evaluation.completed(None)  # type: ignore[arg-type]
    ood = OODCalibration(generator, DECODER_PROBE if meta.architecture.name == "mmgsn"
                         else None, cache, split["train"], torch_device, channels)
    ood.completed(None)  # type: ignore[arg-type]
    classifier, fitness_meta = checkpoint.fitness, meta.fitness
    trained = None
    if fitness_steps > 0:  # the trainer's own handler: what `vcemri train` would have trained
        fitness = FitnessTraining(cache, split["train"], split["internal"], torch_device,
                                  fitness_steps, int(options.get("seed", 0)))
        fitness.completed(None)  # type: ignore[arg-type]
        trained = fitness.result
        classifier, fitness_meta = trained.model.cpu(), trained.meta
    seconds = time.perf_counter() - started
    record: dict[str, Any] = {
        "crop": list(crop), "patients": len(split["train"]), "batches": batches,
        "manifest": str(manifest), "command": command, "seconds": round(seconds, 1),
        "source_weights_sha256": checkpoint.weights_sha256,
        "internal_l1_normalized_before": round(before, 5),
        "internal_l1_normalized_after": evaluation.metrics.get("internal_l1_normalized"),
        "fitness_steps": fitness_steps}
    meta = meta.model_copy(update={
        "ood": ood.calibration if ood.layer is not None else meta.ood,
        "fitness": fitness_meta,
        "metrics": {**meta.metrics, **evaluation.metrics},
        "training": {**meta.training, "batchnorm_recalibration": record},
        "created": "", "package_version": ""})
    saved = synthesis.save_checkpoint(out / "model.safetensors", generator.cpu(), meta,
                                      checkpoint.discriminator, classifier)
    (out / "recalibration.json").write_text(json.dumps(record, indent=1))
    return RecalibrationResult(saved, len(split["train"]), batches, seconds, before,
                               float(evaluation.metrics["internal_l1_normalized"]), copy,
                               None if trained is None else trained.meta)
