"""Training MMgSN-Net on a multi-institution manifest (seed 000 "Examples (B)", MODELS.md).

Study design: the training institutions contribute the same number of patients each (the
smallest count, others dropped at random: mixture modelling), split per institution at the
patient level 70 % training / 30 % internal evaluation; every other institution is external.
The split is written next to the model.

Losses (training/objectives.py): L1 (weight 100, as pix2pix; the seed gives none) plus
least-squares adversarial loss against the conditional PatchGAN, or CycleGAN's unpaired cycle
objective for the CycleGAN baseline; Adam, learning rate 2e-4, betas (0.5, 0.999) (the seed
names Adam and the rate). Inputs and target are normalized (``--normalization``, seed 001's
six: z-score or min-max at patient, slice or dataset level; per-patient z-score by default),
the target with the T1w's statistics; the generator's output is linear for z-scores and tanh
for min-max. Dataset-level statistics are the training patients' (pooled over their heads)
and go into the checkpoint.

The loop (training/loop.py) is short; what happens around it are handlers
(training/handlers.py): step limit, learning-rate schedule, resumable state, logs, progress,
BatchNorm recalibration after crop training, internal evaluation and OOD calibration.

At the end the checkpoint stores what inference needs: the institution profiles (names,
scanner, TR/TE ranges) with EDM statistics (each institution's mean of patient means), the
OOD calibration on the training studies, the training summary and internal-evaluation L1
next to the trivial baseline 'VCE = T1w'.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import synthesis
from config import InputError

from .augmentation import Augmentation
from .dataset import SliceCache, dataset_statistics, prepare, read_manifest
from .handlers import (
    BatchNormRecalibration,
    CSVLog,
    FitnessTraining,
    InternalEvaluation,
    LearningRateSchedule,
    OODCalibration,
    Progress,
    StateSaver,
    StepLimit,
    TensorBoard,
)
from .loop import EpochData, Handler, Loop
from .objectives import CycleObjective, PairedObjective
from .painting import Painter

DECODER_PROBE = "decode1"
STATE = "training_state.pt"


@dataclass(frozen=True)
class TrainOptions:
    """What and how to train (see the module docstring for the seed's choices)."""

    institutions: tuple[str, ...] | None = None  # training institutions; None: all listed
    epochs: int = 5
    batch_size: int = 4
    width: float = 0.25
    l1_weight: float = 100.0
    adversarial_weight: float = 1.0
    #: CycleGAN's cycle-consistency weight (Zhu et al. 2017: 10)
    cycle_weight: float = 10.0
    learning_rate: float = 2e-4
    internal_fraction: float = 0.3
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = None
    #: save the resumable training state every N steps (and always when max_steps stops it)
    checkpoint_every: int | None = 50
    #: train on random (rows, columns) crops of the model grid (None: whole slices);
    #: the network is fully convolutional, so a crop trains the same weights ~4x faster at
    #: 128 x 112 (the pix2pix practice of training on crops)
    crop: tuple[int, int] | None = None
    #: generator: mmgsn (the seed's), a baseline: unet, hinet, pix2pix, cyclegan, or seed 003's
    #: important (IMPORTANT-Net) (registry names)
    architecture: str = "mmgsn"
    #: input modalities of single-/multi-input models (unet, pix2pix, important; cyclegan
    #: takes one); mmgsn/hinet use both
    inputs: tuple[str, ...] = ("t1w", "t2w")
    #: IMPORTANT-Net: the probability that a micro-batch hides a random non-empty proper
    #: subset of the inputs (seed 003's absent sequences); > 0 makes a checkpoint that accepts
    #: any non-empty subset of its inputs
    modality_dropout: float = 0.0
    #: MMgSN-Net ablations (seed 000 Table 3): fusion "concat" drops SGS
    fusion: str = "sgs"
    multi_level: bool = True
    attention: bool = True
    #: MMgSN-Net with seed 002's confidence module (CG-SAMR), whose learned per-pixel
    #: confidence the node delivers; off: the seed's plain MMgSN-Net
    confidence: bool = True
    #: the last N epochs decay the learning rate linearly towards 0 (pix2pix's n_epochs_decay;
    #: 0: constant, the seed's setting)
    decay_epochs: int = 0
    #: start from this checkpoint's generator and discriminator (fine-tuning, e.g. on a new
    #: institution, seed 001); the architecture must match
    init: str | None = None
    #: mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); no effect
    #: on CPU
    amp: bool = True
    #: steps of the fitness classifier's training after the generator's (0: none)
    fitness_steps: int = 1500
    #: split each process's batch into this many parts with their own BatchNorm statistics
    #: and average their losses: one process then computes what as many DistributedDataParallel
    #: processes would (each part is the share of the rank it stands for)
    micro_batches: int = 1
    #: training augmentation (``training/augmentation.py``): the probability with which each
    #: of its transforms acts on a sample (0: none)
    augment: float = 0.0
    #: intensity normalization, METHOD-LEVEL (synthesis.NORMALIZATIONS; seed 001 compares
    #: z-score and min-max at patient, image and dataset level); stored in the checkpoint
    normalization: str = "zscore-patient"
    #: the network's grid: None, the seeds' 256 x 224 matrix; a spacing (mm), every slice
    #: resampled to square pixels of that size and centred on a canvas that holds the
    #: training set's widest field of view (synthesis.GridPolicy; issue 15, point 5)
    spacing_mm: float | None = None
    #: a CG-SAMR painter's checkpoint (``--architecture cgsamr``): repaint lesion slices with
    #: edited lesions on the fly (``training/painting.py``); None: off
    paint: str | None = None
    #: the probability that a lesion slice is repainted
    paint_probability: float = 0.5
    #: a split.json to take the patients from instead of drawing them (a study's arms share
    #: one split, so they are compared on the same patients): its training and internal
    #: patients of this run's training institutions; every other institution is external
    split: str | None = None


@dataclass
class TrainResult:
    checkpoint: Path
    split: dict[str, list[str]]
    metrics: dict[str, float]
    steps: int
    seconds: float


def _given_split(patients: list[tuple[str, str]], options: TrainOptions
                 ) -> dict[str, list[str]]:
    """The split of ``options.split`` restricted to this run's training institutions."""
    try:
        given = json.loads(Path(options.split).read_text())  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:
        raise InputError(f"--split {options.split}: not a readable split ({exc})") from None
    training_sites = set(options.institutions or {site for _, site in patients})
    train, internal = set(given.get("train", [])), set(given.get("internal", []))
    split: dict[str, list[str]] = {"train": [], "internal": [], "external": [], "dropped": []}
    for patient, site in sorted(patients):
        if site not in training_sites:
            split["external"].append(patient)
        elif patient in train:
            split["train"].append(patient)
        elif patient in internal:
            split["internal"].append(patient)
        else:
            split["dropped"].append(patient)
    if not split["train"]:
        raise InputError(f"--split {options.split} has no training patients of "
                         f"{', '.join(sorted(training_sites))}")
    return split


def design(patients: list[tuple[str, str]], options: TrainOptions) -> dict[str, list[str]]:
    """Mixture modelling and the 70/30 patient split: {train, internal, external} (or the
    split ``options.split`` names)."""
    if options.split is not None:
        return _given_split(patients, options)
    rng = np.random.default_rng(options.seed)
    by_site: dict[str, list[str]] = defaultdict(list)
    for patient, site in patients:
        by_site[site].append(patient)
    training_sites = sorted(options.institutions or by_site)
    unknown = [s for s in training_sites if s not in by_site]
    if unknown:
        raise InputError(f"no patients from training institution(s) {', '.join(unknown)} in "
                         f"the manifest (it has {', '.join(sorted(by_site))})")
    equal = min(len(by_site[s]) for s in training_sites)
    split: dict[str, list[str]] = {"train": [], "internal": [], "external": [], "dropped": []}
    for site in sorted(by_site):
        members = sorted(by_site[site])
        if site not in training_sites:
            split["external"] += members
            continue
        order = list(rng.permutation(members))
        kept, dropped = order[:equal], order[equal:]
        split["dropped"] += sorted(dropped)
        internal = max(1, int(round(options.internal_fraction * equal))) if equal > 1 else 0
        split["internal"] += sorted(kept[:internal])
        split["train"] += sorted(kept[internal:])
    if not split["train"]:
        raise InputError("no training patients left after the split; add patients")
    return split


#: beside a model, the split of the run that made it: where ``vcemri evaluate`` finds it
SPLIT_FILE = "split.json"


def save_split(split: dict[str, list[str]], out: Path) -> Path:
    """``out/split.json``: the patients of each group, beside the model a command writes (train,
    refit-confidence, recalibrate, the painter), so that evaluation keeps its training patients
    out even on a manifest that lacks some of its training sites."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / SPLIT_FILE
    path.write_text(json.dumps(split, indent=1))
    return path


def training_sites(checkpoint: synthesis.Checkpoint) -> set[str]:
    """The institutions a checkpoint was trained on (the ones its metadata records, else those
    of its institution profiles)."""
    return set(checkpoint.meta.training.get("training_institutions") or
               [p.key for p in checkpoint.meta.institutions])


def model_split(path: str | Path, checkpoint: synthesis.Checkpoint,
                patients: list[tuple[str, str]]) -> tuple[dict[str, list[str]], str | None]:
    """The split of the run that made the model at ``path``: its ``split.json`` (for a shipped
    model ``builtin:NAME``, the ``.split.json`` beside its weights), else (the default shipped
    model, a copied checkpoint) :func:`recorded_design` on ``patients`` (patient,
    institution); ``({}, why)`` when neither is there."""
    beside = (synthesis.resolve_checkpoint(path).with_suffix(".split.json")
              if synthesis.is_builtin(path) else Path(path).with_name(SPLIT_FILE))
    if beside.is_file():
        return dict(json.loads(beside.read_text())), None
    try:
        return recorded_design(checkpoint.meta.training, patients), None
    except InputError as error:  # too little recorded, or a training site not in ``patients``
        return {}, error.reason


def recorded_design(training: dict[str, Any], patients: list[tuple[str, str]]
                    ) -> dict[str, list[str]]:
    """The split :func:`design` made for a checkpoint, recomputed from what its metadata's
    ``training`` records (seed, institutions, internal fraction: the design depends on nothing
    else); :class:`config.InputError` when it records no seed or none of its training
    institutions is among ``patients``."""
    options = training.get("options") or {}
    sites = options.get("institutions") or training.get("training_institutions")
    if "seed" not in options:
        raise InputError("the checkpoint does not record how it was trained (its seed), so "
                         "its split cannot be recomputed")
    return design(patients, TrainOptions(
        institutions=tuple(sites) if sites else None, seed=int(options["seed"]),
        internal_fraction=float(options.get("internal_fraction", 0.3))))


def _profiles(cache: SliceCache, patients: set[str]) -> list[Any]:
    groups: dict[str, list[Any]] = defaultdict(list)
    for p in cache.patients:
        if p.patient in patients:
            groups[p.institution].append(p)
    profiles = []
    for site, members in sorted(groups.items()):
        first = members[0].header

        def span(key: str, members: list[Any] = members) -> tuple[float, float] | None:
            values = [m.header[key] for m in members if m.header.get(key) is not None]
            return (float(min(values)), float(max(values))) if values else None

        profiles.append(synthesis.InstitutionProfile(
            key=site,
            manufacturer=str(first.get("manufacturer") or ""),
            model=str(first.get("model") or ""),
            field_strength_t=first.get("field_strength_t"),
            institution_names=sorted({str(m.header["institution_name"]) for m in members
                                      if m.header.get("institution_name")}),
            station_names=sorted({str(m.header["station_name"]) for m in members
                                  if m.header.get("station_name")}),
            sequences={role: synthesis.SequenceRange(repetition_time_ms=span(f"{role}_tr"),
                                                     echo_time_ms=span(f"{role}_te"))
                       for role in ("t1w", "t2w")},
            # EDM's mu: the mean over the institution's patients of each patient's mean.
            patient_mean={m: synthesis.edm_dataset_mean(p.means[m] for p in members)
                          for m in ("t1w", "t2w")},
            patient_mean_std={m: float(np.std([p.means[m] for p in members])) + 1e-6
                              for m in ("t1w", "t2w")},
            patients=len(members),
        ))
    return profiles


def _resumable(options: TrainOptions) -> dict[str, Any]:
    """The options that must not change between an interrupted run and its resumption."""
    kept = asdict(options)
    for free in ("epochs", "max_steps", "checkpoint_every", "device", "amp"):
        kept.pop(free)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kept.items()}


def normalization_of(options: TrainOptions) -> synthesis.Normalization:
    """The intensity normalization ``options`` name."""
    try:
        return synthesis.Normalization.named(options.normalization)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def build_generator(options: TrainOptions) -> torch.nn.Module:
    """The generator ``options`` name, with the output its normalization needs (linear for
    z-scores, tanh for min-max's [-1, 1])."""
    name = options.architecture
    if name not in synthesis.GENERATORS:
        raise InputError(f"vcemri train cannot train {name!r} (it trains "
                         f"{', '.join(synthesis.GENERATORS)})")
    config: dict[str, Any] = {"width_multiplier": options.width,
                              "output": normalization_of(options).output}
    if name == "mmgsn":
        config.update(fusion=options.fusion, multi_level=options.multi_level,
                      attention=options.attention, confidence=options.confidence)
    elif name in ("unet", "pix2pix", "cyclegan", "important"):
        config["inputs"] = tuple(options.inputs)
    if name == "important":
        config["accepts_subsets"] = options.modality_dropout > 0
    elif options.modality_dropout > 0:
        raise InputError("--modality-dropout is for IMPORTANT-Net (--architecture important), "
                         "which leaves absent sequences out")
    if name == "important" and options.crop and any(c % 16 for c in options.crop):
        raise InputError(f"IMPORTANT-Net halves the image four times: crop {options.crop[0]}x"
                         f"{options.crop[1]} must be multiples of 16 (e.g. 128x112)")
    if name == "cyclegan" and len(options.inputs) != 1:
        raise InputError("CycleGAN translates one modality into CE-T1w (seed 000 trains "
                         "CycleGAN (T1w) and CycleGAN (T2w)): give --inputs t1w or --inputs t2w")
    if name == "pix2pix" and options.crop and any(c % 32 for c in options.crop):
        raise InputError(f"pix2pix halves the image five times: crop {options.crop[0]}x"
                         f"{options.crop[1]} must be multiples of 32 (e.g. 128x96)")
    if name == "cyclegan" and options.crop and any(c % 4 for c in options.crop):
        raise InputError(f"CycleGAN's generator halves the image twice: crop {options.crop[0]}x"
                         f"{options.crop[1]} must be multiples of 4")
    return synthesis.build_model(name, **config)


def build_objective(options: TrainOptions, generator: torch.nn.Module,
                    discriminator: torch.nn.Module, channels: list[int], device: torch.device,
                    world: int, autocast: Any, scaling: bool) -> PairedObjective | CycleObjective:
    """The training objective of ``options.architecture`` (see training/objectives.py)."""
    common = {"learning_rate": options.learning_rate, "autocast": autocast,
              "scaling": scaling, "world": world, "device": device,
              "micro_batches": options.micro_batches}
    if options.architecture == "cyclegan":
        if options.micro_batches != 1:
            raise InputError("CycleGAN trains on whole batches: leave --micro-batches at 1")
        return CycleObjective(generator, discriminator, channels, options.cycle_weight,
                              options.adversarial_weight, **common)
    return PairedObjective(generator, discriminator, channels, options.l1_weight,
                           options.adversarial_weight, modality_dropout=options.modality_dropout,
                           seed=options.seed, **common)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_option: str) -> tuple[Distributed, torch.device]:
    """Join the process group ``torchrun`` describes in the environment (NCCL on CUDA, gloo on
    CPU) and pick this rank's device; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), synthesis.inference_device(device_option)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = synthesis.inference_device(device_option)
    if wanted.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank), device


def autocast_for(device: torch.device, enabled: bool) -> tuple[Any, torch.dtype | None]:
    """The mixed-precision context for training on ``device`` and its dtype (bf16 where the
    GPU supports it, else fp16, which needs loss scaling); (None, None) on CPU or disabled."""
    if not enabled or device.type != "cuda":
        return None, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


def _initialize(generator: torch.nn.Module, discriminator: torch.nn.Module, path: Path) -> None:
    """Copy a checkpoint's weights into freshly built models of the same architecture."""
    start = synthesis.load_checkpoint(path)
    if start.generator.config != generator.config:
        raise InputError(f"--init {path}: its generator ({start.meta.architecture.name} "
                         f"{start.generator.config}) differs from the one asked for "
                         f"({generator.config}); use the same architecture options")
    generator.load_state_dict(start.generator.state_dict())
    if start.discriminator is not None:
        discriminator.load_state_dict(start.discriminator.state_dict())


def _data(manifest: Path, out: Path, options: TrainOptions, place: Distributed,
          progress: Callable[[str, dict[str, Any]], None] | None
          ) -> tuple[dict[str, list[str]], SliceCache]:
    """The split (written to ``out/split.json``) and the preprocessed cache; rank 0 prepares
    it while the other ranks of a distributed run wait, then read it."""
    import torch.distributed as dist

    entries = read_manifest(Path(manifest))
    split = design([(e.patient, e.institution) for e in entries], options)
    used = [e for e in entries if e.patient in set(split["train"]) | set(split["internal"])]
    normalization = normalization_of(options)
    # dataset-level normalization divides by the training patients' statistics, which rank 0
    # measures and writes for the others
    statistics = out / "dataset_statistics.json"
    if place.main:
        save_split(split, out)
        dataset = None
        if normalization.level == "dataset":
            dataset = dataset_statistics([e for e in entries if e.patient in set(split["train"])],
                                         tuple(options.inputs))
            statistics.write_text(json.dumps({k: v.as_dict() for k, v in dataset.items()}))
        cache = prepare(used, out / "cache", normalization, progress=(
            lambda p: progress("prepare", {"patient": p})) if progress else None,
            dataset=dataset, inputs=tuple(options.inputs), grid=options.spacing_mm)
    if place.world > 1:
        dist.barrier()  # the other ranks read the cache rank 0 wrote
    if not place.main:
        dataset = None if normalization.level != "dataset" else {
            k: synthesis.Statistics(**v) for k, v in json.loads(statistics.read_text()).items()}
        cache = prepare(used, out / "cache", normalization, dataset=dataset,
                        inputs=tuple(options.inputs), grid=options.spacing_mm)
    return split, cache


def _painter(options: TrainOptions, cache: SliceCache, manifest: Path,
             split: dict[str, list[str]]) -> Painter | None:
    """The CG-SAMR painter ``options.paint`` names, ready for the training patients."""
    if options.paint is None:
        return None
    painter = Painter(Path(options.paint), options.paint_probability, options.seed)
    if not painter.prepare(cache, read_manifest(Path(manifest)),
                           cache.rows(set(split["train"]))):
        raise InputError("--paint: no training patient has a tumour mask with a lesion to "
                         "repaint (the manifest's mask column)")
    return painter


def _painted(painter: Painter | None) -> dict[str, Any]:
    """What the checkpoint records of the painter that repainted its lesions."""
    if painter is None:
        return {}
    trained = painter.meta.get("training", {})
    return {"painter": {"path": str(painter.path), "probability": painter.probability,
                        "lesion_slices": len(painter.labels),
                        **{k: trained.get(k) for k in ("institutions", "steps", "seconds",
                                                       "command")}}}


def _acquisition(cache: SliceCache, patients: set[str]) -> synthesis.AcquisitionRanges:
    """The geometry of the training T1w series."""
    def span(key: str) -> tuple[float, float] | None:
        values = [float(p.header[key]) for p in cache.patients
                  if p.patient in patients and p.header.get(key) is not None]
        return (round(min(values), 4), round(max(values), 4)) if values else None

    return synthesis.AcquisitionRanges(slice_spacing_mm=span("slice_spacing_mm"),
                                       pixel_spacing_mm=span("pixel_spacing_mm"))


def _metadata(options: TrainOptions, generator: torch.nn.Module,
              discriminator: torch.nn.Module, cache: SliceCache, split: dict[str, list[str]],
              ood: synthesis.OODCalibration, fitness: synthesis.FitnessMeta | None,
              objective: Any, details: dict[str, Any],
              metrics: dict[str, float]) -> synthesis.CheckpointMeta:
    """What the checkpoint carries besides the weights (see the module docstring)."""
    sites = sorted({p.institution for p in cache.patients if p.patient in set(split["train"])})
    guided = getattr(objective, "guided", False)
    return synthesis.CheckpointMeta(
        architecture=synthesis.Architecture(name=options.architecture, config=generator.config),
        discriminator=synthesis.Architecture(name="patchgan", config=discriminator.config),
        model_grid=cache.grid.canvas, model_spacing_mm=cache.grid.spacing_mm,
        normalization=synthesis.NormalizationMeta(
            method=cache.normalization["method"], level=cache.normalization["level"],
            dataset_statistics={role: synthesis.IntensityStatistics(**stats.as_dict())
                                for role, stats in cache.dataset_statistics.items()}),
        institutions=_profiles(cache, set(split["train"])), ood=ood, fitness=fitness,
        acquisition=_acquisition(cache, set(split["train"])),
        confidence=synthesis.ConfidenceMeta(loss_lambda=objective.regularizer.value)
        if guided else None,
        training={"options": asdict(options), "training_institutions": sites, **details,
                  "patients": {k: len(v) for k, v in split.items()}},
        metrics=metrics,
        description=f"{options.architecture} width {options.width} trained by vcemri train on "
                    f"{', '.join(sites)}")


def _rank_checksums(generator: torch.nn.Module, place: Distributed) -> list[str]:
    """SHA-256 of each process's trained generator parameters (BatchNorm statistics, which
    stay per process, left out): DistributedDataParallel keeps the ranks identical, and the
    checkpoint says whether it did."""
    import hashlib

    digest = hashlib.sha256()
    for name, parameter in sorted(generator.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    if place.world == 1:
        return [digest.hexdigest()]
    gathered: list[Any] = [None] * place.world
    torch.distributed.all_gather_object(gathered, digest.hexdigest())
    return [str(v) for v in gathered]


def _provenance(manifest: Path, command: str | None) -> dict[str, Any]:
    """How the model came to be: the command line, and the simulated cohort's options when
    the manifest is the simulator's (its cohort.json lies beside it)."""
    found: dict[str, Any] = {"manifest": str(manifest)}
    if command:
        found["command"] = command
    cohort = Path(manifest).with_name("cohort.json")
    if cohort.is_file():
        found["cohort"] = json.loads(cohort.read_text()).get("options", {})
    return found


def train(manifest: Path, out: Path, options: TrainOptions,
          progress: Callable[[str, dict[str, float]], None] | None = None,
          resume: bool = False, command: str | None = None) -> TrainResult:
    """Train, evaluate internally, calibrate, and save ``out/model.safetensors`` (its metadata
    records ``command``, the command line that trained it).

    With ``resume``, continue from ``out/training_state.pt`` (models, optimizers, loss scalers,
    schedulers, position in the epoch) exactly where the interrupted run stopped. Under
    ``torchrun`` every rank trains on its share of each global batch (``batch_size`` is the
    global batch) with DistributedDataParallel; rank 0 prepares the cache, logs, saves and
    calibrates."""
    started, out = time.perf_counter(), Path(out)
    place, device = setup_distributed(options.device)
    split, cache = _data(manifest, out, options, place, progress)
    torch.manual_seed(options.seed)
    generator = build_generator(options).to(device)
    # CycleGAN's discriminators judge one domain's slices alone (unconditional, as its paper)
    discriminator = synthesis.build_model(
        "patchgan", width_multiplier=options.width,
        conditional=options.architecture != "cyclegan",
        condition_channels=len(cache.roles)).to(device)
    if options.init is not None:
        _initialize(generator, discriminator, Path(options.init))
    channels = [cache.roles.index(m) for m in getattr(generator, "inputs", ("t1w", "t2w"))]
    autocast, amp_dtype = autocast_for(device, options.amp)
    objective = build_objective(options, generator, discriminator, channels, device,
                                place.world, autocast, amp_dtype == torch.float16)
    data = EpochData(cache, cache.rows(set(split["train"])), batch_size=options.batch_size,
                     seed=options.seed, rank=place.rank, world=place.world, crop=options.crop,
                     unpaired=objective.unpaired, device=device, parts=options.micro_batches,
                     augmentation=(Augmentation(options.seed, options.augment)
                                   if options.augment > 0 else None),
                     painter=_painter(options, cache, manifest, split))
    schedule = LearningRateSchedule(objective.optimizers, options.epochs, options.decay_epochs)
    log = CSVLog(out / "training_log.csv", objective.losses, started) if place.main else None
    board = TensorBoard(out / "tensorboard") if place.main else None
    saver = StateSaver(out / STATE, objective.modules, options.checkpoint_every,
                       _resumable(options), log, schedule)
    evaluation = InternalEvaluation(generator, cache, cache.rows(set(split["internal"])),
                                    device, channels, board)
    ood = OODCalibration(generator, DECODER_PROBE if options.architecture == "mmgsn" else None,
                         cache, split["train"], device, channels)
    fitness = (FitnessTraining(cache, split["train"], split["internal"], device,
                               options.fitness_steps, options.seed)
               if options.fitness_steps > 0 else None)
    recalibration = (BatchNormRecalibration(generator,
                                            lambda: data.statistics_batches(channels), device)
                     if options.crop is not None else None)
    # in this order: stop before saving, log before saving, recalibrate before evaluating
    handlers: list[Handler | None] = [StepLimit(options.max_steps), schedule,
                                      Progress(progress) if progress else None]
    if place.main:
        handlers += [log, saver, recalibration, evaluation, ood, fitness, board]
    state = saver.restore(device) if resume else None
    loop = Loop(objective, data, [h for h in handlers if h is not None], options.epochs, state)
    loop.run()
    ranks = _rank_checksums(generator, place)
    if place.world > 1:
        torch.distributed.destroy_process_group()
    seconds = log.elapsed() if log is not None else time.perf_counter() - started
    if not place.main:
        return TrainResult(out / "model.safetensors", split, {}, loop.state.step, seconds)
    classifier = fitness.result if fitness is not None else None
    meta = _metadata(options, generator, discriminator, cache, split, ood.calibration,
                     classifier.meta if classifier else None, objective, {
        **_provenance(manifest, command), **_painted(data.painter),
        "steps": loop.state.step, "seconds": round(seconds, 1),
        "processes": place.world, "rank_weights_sha256": ranks, "device": str(device),
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off"},
        evaluation.metrics)
    checkpoint = synthesis.save_checkpoint(
        out / "model.safetensors", generator.cpu(), meta, discriminator.cpu(),
        classifier.model.cpu() if classifier else None)
    return TrainResult(checkpoint, split, evaluation.metrics, loop.state.step, seconds)
