"""Model checkpoints: safetensors weights with the JSON metadata inference needs, in one file.

The safetensors header carries ``vcemri`` (the :class:`CheckpointMeta` JSON) and
``weights_sha256`` (SHA-256 over every tensor's name, dtype, shape and bytes in name order), so
a checkpoint is self-describing and a flipped byte anywhere is caught. Loading validates the
format and version, the architecture, every tensor against the architecture, and the checksum,
and refuses anything else with a :class:`config.ModelError` that says why.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from config import ModelError

from .model_inputs import read_header
from .models import build

FORMAT = "vcemri-checkpoint"
FORMAT_VERSION = 1


class _Meta(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Architecture(_Meta):
    """A registry model and the keyword arguments that build it."""

    name: str
    config: dict[str, Any] = Field(default_factory=dict)


class IntensityStatistics(_Meta):
    """Head intensity statistics (scanner units)."""

    mean: float
    std: float
    minimum: float
    maximum: float


class NormalizationMeta(_Meta):
    method: Literal["zscore", "minmax"] = "zscore"
    level: Literal["patient", "image", "dataset"] = "patient"
    #: dataset-level statistics per modality (t1w, t2w), when level == "dataset"
    dataset_statistics: dict[str, IntensityStatistics] = Field(default_factory=dict)


class SequenceRange(_Meta):
    """TR/TE ranges (ms) a training institution used for one modality."""

    repetition_time_ms: tuple[float, float] | None = None
    echo_time_ms: tuple[float, float] | None = None


class InstitutionProfile(_Meta):
    """What identifies a training institution, for institution classification and EDM."""

    key: str
    manufacturer: str = ""
    model: str = ""
    field_strength_t: float | None = None
    institution_names: list[str] = Field(default_factory=list)
    station_names: list[str] = Field(default_factory=list)
    sequences: dict[str, SequenceRange] = Field(default_factory=dict)
    #: EDM mu per modality: mean over the institution's training patients of each patient's
    #: mean head intensity (scanner units).
    patient_mean: dict[str, float] = Field(default_factory=dict)
    #: spread (std) of the per-patient means, per modality, for the intensity fallback
    patient_mean_std: dict[str, float] = Field(default_factory=dict)
    patients: int = 0


class AcquisitionRanges(_Meta):
    """The geometry of the training T1w series (mm), (lowest, highest): what the model has
    seen, for screening (synthesis.checks.geometry)."""

    slice_spacing_mm: tuple[float, float] | None = None
    pixel_spacing_mm: tuple[float, float] | None = None


class OODCalibration(_Meta):
    """Fitness screening: a Mahalanobis distance on pooled generator features, with the
    threshold set on training data (``quantile`` of the training studies' distances)."""

    feature: str = "decoder1-pooled"
    mean: list[float] = Field(default_factory=list)
    precision: list[list[float]] = Field(default_factory=list)
    threshold: float | None = None
    quantile: float = 0.99


class FitnessMeta(_Meta):
    """The fitness classifier (synthesis/models/fitness.py): its architecture, the study
    score (mean slice logit) below which a study is refused, and how it was calibrated."""

    architecture: Architecture
    #: study logit threshold: at most ``false_refusal_target`` of the internal patients below
    threshold: float
    false_refusal_target: float = 0.05
    #: what the calibration measured: internal patients' scores, detection per fault kind
    calibration: dict[str, Any] = Field(default_factory=dict)
    faults: list[str] = Field(default_factory=list)


class ConfidenceMeta(_Meta):
    """Seed 002's confidence module as trained: the final lambda of its loss, so that a
    learned confidence c means an expected half-resolution error of lambda / c (normalised
    T1w units; synthesis.inference turns it into the delivered confidence)."""

    loss_lambda: float
    #: how ``vcemri refit-confidence`` refitted the error head afterwards (training/
    #: confidence.py: steps, augmentation, patients, command, seconds), if it did
    refit: dict[str, Any] | None = None
    #: what the error head predicts: None, the expected absolute error; q, the error the VCE
    #: exceeds with probability 1 - q (``vcemri refit-confidence --quantile q``)
    error_quantile: float | None = None


class CheckpointMeta(_Meta):
    """Everything besides the weights (seed choices named in MODELS.md are recorded here)."""

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    package_version: str = ""
    created: str = ""
    architecture: Architecture
    discriminator: Architecture | None = None
    #: the network's grid, rows x columns: the seeds' fixed matrix, or with
    #: ``model_spacing_mm`` the canvas its fixed-spacing slices are centred on
    model_grid: tuple[int, int] = (256, 224)
    #: None: every slice stretched to ``model_grid`` (seed 000 (B)); a spacing (mm): slices
    #: resampled to square pixels of that size (synthesis.preprocess.GridPolicy)
    model_spacing_mm: float | None = None
    background: str = "triangle"
    normalization: NormalizationMeta = Field(default_factory=NormalizationMeta)
    institutions: list[InstitutionProfile] = Field(default_factory=list)
    acquisition: AcquisitionRanges = Field(default_factory=AcquisitionRanges)
    ood: OODCalibration = Field(default_factory=OODCalibration)
    fitness: FitnessMeta | None = None
    confidence: ConfidenceMeta | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    description: str = ""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _package_version() -> str:
    try:
        return metadata.version("vcemri")
    except metadata.PackageNotFoundError:
        return "unknown"


def save_checkpoint(path: Path, generator: nn.Module, meta: CheckpointMeta,
                    discriminator: nn.Module | None = None,
                    fitness: nn.Module | None = None) -> Path:
    """Write the generator (and optionally the discriminator and the fitness classifier,
    whose threshold ``meta.fitness`` holds) with ``meta``, atomically."""
    if (fitness is None) != (meta.fitness is None):
        raise ValueError("a fitness classifier and its metadata go together")
    tensors = {}
    for prefix, module in (("generator", generator), ("discriminator", discriminator),
                           ("fitness", fitness)):
        if module is not None:
            tensors.update({f"{prefix}.{k}": v.detach().contiguous().cpu()
                            for k, v in module.state_dict().items()})
    meta = meta.model_copy(update={
        "package_version": meta.package_version or _package_version(),
        "created": meta.created or _dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds"),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata={
        "vcemri": meta.model_dump_json(), "weights_sha256": _checksum(tensors)})
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


class Checkpoint:
    """A loaded, validated checkpoint: ``meta``, ``generator`` (eval mode, CPU) and, when
    saved, ``discriminator``."""

    def __init__(self, path: Path, meta: CheckpointMeta, generator: nn.Module,
                 discriminator: nn.Module | None, weights_sha256: str = "",
                 fitness: nn.Module | None = None) -> None:
        self.path = path
        self.meta = meta
        self.generator = generator
        self.discriminator = discriminator
        self.weights_sha256 = weights_sha256
        self.fitness = fitness


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Load and validate a checkpoint (see the module docstring for what is checked)."""
    path = Path(path)
    header = read_header(path)
    if "vcemri" not in header:
        raise ModelError(f"{path} is not a vcemri checkpoint (no vcemri metadata)")
    try:
        raw = json.loads(header["vcemri"])
    except ValueError:
        raise ModelError(f"{path}: the checkpoint metadata is not valid JSON") from None
    if raw.get("format") != FORMAT:
        raise ModelError(f"{path} is not a vcemri checkpoint (format {raw.get('format')!r})")
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(
            f"{path} has checkpoint format version {version}; this vcemri reads up to "
            f"{FORMAT_VERSION}", hint="upgrade vcemri or re-export the model")
    try:
        meta = CheckpointMeta.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModelError(f"{path}: invalid checkpoint metadata at {where}: {first['msg']}") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"checkpoint {path} is corrupted: {exc}") from None
    if _checksum(tensors) != header.get("weights_sha256"):
        raise ModelError(f"checkpoint {path} is corrupted: the weights' checksum does not match")
    generator = _restore(path, meta.architecture, tensors, "generator")
    if meta.ood.threshold is not None and meta.ood.feature not in dict(generator.named_modules()):
        raise ModelError(f"{path}: the OOD calibration names layer {meta.ood.feature!r}, which "
                         f"{meta.architecture.name} does not have")
    if meta.normalization.level == "dataset":
        absent = [m for m in ("t1w", "t2w") if m not in meta.normalization.dataset_statistics]
        if absent:
            raise ModelError(f"{path}: dataset-level normalization without the training set's "
                             f"statistics for {', '.join(absent)}")
    discriminator = (None if meta.discriminator is None
                     else _restore(path, meta.discriminator, tensors, "discriminator"))
    fitness = (None if meta.fitness is None
               else _restore(path, meta.fitness.architecture, tensors, "fitness"))
    return Checkpoint(path, meta, generator, discriminator, header["weights_sha256"], fitness)


def _restore(path: Path, architecture: Architecture, tensors: dict[str, torch.Tensor],
             prefix: str) -> nn.Module:
    try:
        model = build(architecture.name, **architecture.config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: cannot build {prefix} {architecture.name!r}: {exc}") from None
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        details = "; ".join(part for part in (
            f"missing {len(missing)} (e.g. {missing[0]})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else "",
            f"wrong shape {len(wrong)} (e.g. {wrong[0]})" if wrong else "") if part)
        raise ModelError(f"{path}: the {prefix} weights do not fit {architecture.name} "
                         f"with its stored configuration: {details}")
    model.load_state_dict(state, strict=True)
    return model.eval()
