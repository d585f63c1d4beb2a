"""Simulated multi-institution NPC cohorts: patients -> DICOM series, masks and a manifest.

Layout of a cohort directory::

    manifest.csv                 patient,institution,role,path (t1w, t2w, ce, mask, seg;
                                 with --dwi also dwi, adc)
    cohort.json                  options, institutions, and per patient the tumour and protocol
    preview.png                  optional montage, one row per institution
    inst1/inst1-001/t1w/0001.dcm ...   one folder per series
    inst1/inst1-001/tumour.nii.gz      ground truth on the T1w grid
    inst1/inst1-001/tumour_seg.dcm     the same as DICOM SEG
    inst1/inst1-001/dwi/, adc/         with --dwi: b = 0 and 1000 in one series, the ADC map

Each patient draws from its own random stream, ``SeedSequence([seed, institution, index])``,
so a patient is the same whatever the worker count, the order, or the other institutions.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

import synthesis
from config import StorageError, VcemriError

from . import diffusion
from .acquisition import (
    Artefacts,
    Geometry,
    Scene,
    acquire,
    default_slices,
    draw_protocols,
    make_geometry,
    scene,
)
from .export import (
    PatientInfo,
    diffusion_datasets,
    series_datasets,
    write_mask_nifti,
    write_mask_seg,
)
from .lesions import sample_lesion
from .pelvis import pelvis_scene
from .phantom import Patient, sample_patient
from .preview import write_preview
from .randomized import RandomDraw, check_families, draw, stream_key
from .record import PatientRecord
from .sites import ROLES, SITES, Role, Site

MANIFEST = "manifest.csv"
COHORT = "cohort.json"
MANIFEST_COLUMNS = ("patient", "institution", "role", "path")


@dataclass(frozen=True)
class SimulationOptions:
    """What to simulate. ``matrix_scale`` < 1 and ``slices`` make small, fast test cohorts;
    ``misalign_mm`` moves the patient between series (rigid, up to that many mm and
    ``misalign_mm / 2`` degrees), as seed 000 FIG. 10 shows for unregistered hospital data.

    ``randomized`` adds that many patients with randomised protocols (simulation/randomized.py)
    as the institution ``random_name``, their T1w and T2w drawn from ``families`` ((role,
    names) pairs; default every family). With ``random_groups`` > 1 they are dealt in turn to
    that many institutions ``<random_name>1``, ``<random_name>2``, ... (training takes equal
    patients from each institution; every patient still draws its own protocol, and is the
    same patient whatever the grouping).

    ``lesions`` paints that many extra lesions into every patient (seed 004's tumour
    augmentation, simulation/lesions.py), drawn from their own random stream: the patient,
    protocol and noise are the same as without them.

    ``dwi`` adds a diffusion-weighted series (b = 0 and 1000 s/mm^2) and its ADC map to every
    head (simulation/diffusion.py), drawn from their own random stream after the other series:
    everything else is the same as without them."""

    institutions: tuple[str, ...] = tuple(SITES)
    patients_per_institution: int = 5
    seed: int = 0
    matrix_scale: float = 1.0
    slices: int | None = None
    misalign_mm: float = 0.0
    randomized: int = 0
    random_name: str = "random"
    random_groups: int = 1
    lesions: int = 0
    families: tuple[tuple[Role, tuple[str, ...]], ...] = ()
    dwi: bool = False

    def __post_init__(self) -> None:
        unknown = [k for k in self.institutions if k not in SITES]
        if unknown:
            raise VcemriError(
                f"unknown institution {', '.join(unknown)} (known: {', '.join(SITES)})"
            )
        if not self.institutions and self.randomized < 1:
            raise VcemriError("nothing to simulate: name an institution or randomise patients")
        if self.randomized < 0:
            raise VcemriError("randomised patients must be 0 or more")
        if not 0 <= self.lesions <= 8:
            raise VcemriError(f"{self.lesions} extra lesions per patient: 0-8")
        if not 1 <= self.random_groups <= max(1, self.randomized):
            raise VcemriError(f"{self.random_groups} groups of randomised patients: between 1 "
                              f"and the number of randomised patients ({self.randomized})")
        if self.random_name in SITES or not self.random_name.replace("-", "").isalnum():
            raise VcemriError(f"{self.random_name!r} cannot name randomised patients: use "
                              "letters, digits and '-', and not a fixed site's key")
        try:
            check_families(dict(self.families))
        except ValueError as exc:
            raise VcemriError(str(exc)) from None
        if self.patients_per_institution < 1:
            raise VcemriError("patients per institution must be at least 1")
        if not 0.05 <= self.matrix_scale <= 2.0:
            raise VcemriError(f"matrix scale {self.matrix_scale} is outside 0.05-2")
        if self.slices is not None and self.slices < 2:
            raise VcemriError("a series needs at least 2 slices")
        if not 0.0 <= self.misalign_mm <= 20.0:
            raise VcemriError(f"misalignment {self.misalign_mm} mm is outside 0-20 mm")


def _patient_info(site: Site, index: int, seed: int,
                  rng: np.random.Generator) -> PatientInfo:
    patient_id = f"{site.key}-{index:03d}"
    uid_seed = f"vcemri-sim/{seed}/{patient_id}"
    start = _dt.datetime(2023, 1, 2, 8, 0) + _dt.timedelta(
        days=int(rng.integers(0, 700)), minutes=int(rng.integers(0, 9 * 60)))
    return PatientInfo(
        patient_id=f"SIM-{patient_id.upper()}",
        patient_name=f"SIM^{patient_id.upper()}",
        sex="M" if rng.random() < 0.75 else "F",  # NPC is about 3:1 male (seed 000 Table 1)
        age_years=int(np.clip(rng.normal(54, 12), 20, 85)),
        weight_kg=float(np.clip(rng.normal(65, 10), 40, 110)),
        study_uid=synthesis.derived_uid(uid_seed, "study"),
        frame_of_reference_uid=synthesis.derived_uid(uid_seed, "frame"),
        study_datetime=start,
        uid_seed=uid_seed,
    )


def _slice_of_interest(mask: np.ndarray) -> int:
    areas = mask.reshape(len(mask), -1).sum(axis=1)
    return int(np.argmax(areas)) if areas.any() else len(mask) // 2


def _nearest_slice(geometry: Geometry, point: np.ndarray) -> int:
    distances = (geometry.positions - point) @ geometry.normal
    return int(np.argmin(np.abs(distances)))


def simulate_patient(out: Path, key: str, index: int, options: SimulationOptions,
                     with_preview: bool = False, *, site: Site | None = None,
                     body: Literal["head", "pelvis"] = "head",
                     tumour_diameter_mm: float | None = None) -> PatientRecord:
    """Simulate and write one patient; returns its record (paths relative to ``out``).

    ``key`` is a fixed site's, or ``options.random_name`` for a patient whose scanner,
    protocol and anatomy variation are drawn (:func:`simulation.randomized.draw`).

    For screening's benchmarks and tests: ``site`` replaces the catalogue's site ``key``
    (another protocol or geometry, the same patient), ``body="pelvis"`` images a pelvis
    instead of the head (a wrong body part; no tumour, no ground-truth mask), and
    ``tumour_diameter_mm`` fixes the tumour's size."""
    drawn: RandomDraw | None = None
    if key in SITES:
        stream = list(SITES).index(key)
    elif key in random_groups(options):
        stream = stream_key(options.random_name)
        drawn = draw(key, index, np.random.default_rng(
            np.random.SeedSequence([options.seed, stream, index, 1])), dict(options.families))
    else:
        raise VcemriError(f"unknown institution {key!r} (known: {', '.join(SITES)})")
    site = site or (drawn.site if drawn else SITES[key])
    rng = np.random.default_rng(np.random.SeedSequence([options.seed, stream, index]))
    patient = sample_patient(rng, tumour_diameter_mm)
    movement = options.misalign_mm
    artefacts = None
    if drawn is not None:
        patient = drawn.anatomy.apply(patient)
        movement = max(movement, drawn.anatomy.movement_mm)
        artefacts = drawn.anatomy.artefacts
    if options.lesions:
        lesion_rng = np.random.default_rng(
            np.random.SeedSequence([options.seed, stream, index, 2]))
        patient = replace(patient, lesions=tuple(sample_lesion(lesion_rng)
                                                 for _ in range(options.lesions)))
    protocols = draw_protocols(site, rng)
    info = _patient_info(site, index, options.seed, rng)
    gain = float(rng.lognormal(0.0, 0.08))  # per-session receiver gain
    move_rng = np.random.default_rng(rng.integers(0, 2**63))
    noise_rng = np.random.default_rng(rng.integers(0, 2**63))

    folder = out / key / f"{key}-{index:03d}"
    slices = options.slices or default_slices(site.grid)
    scenes: dict[tuple[object, ...], Scene] = {}
    volumes: dict[Role, np.ndarray] = {}
    geometries: dict[Role, Geometry] = {}
    datasets = {}
    misalignment: dict[str, list[float]] = {}
    paths: dict[str, str] = {}
    for role in ROLES:
        subject = patient
        if movement > 0 and role != "t1w":
            subject = patient.moved(move_rng, movement, movement / 2)
            misalignment[role] = [round(float(v - w), 3) for v, w in
                                  zip(subject.translation, patient.translation, strict=True)]
        grid = site.grid_for(role)
        # A series on its own grid covers what the T1w covers (one planned slab).
        count = max(2, int(round(slices * site.grid.slice_spacing_mm / grid.slice_spacing_mm)))
        geometry = make_geometry(grid, count, site.tilt_deg,
                                 options.matrix_scale)
        cache_key = (id(subject), geometry.rows, geometry.columns, geometry.row_spacing_mm)
        if cache_key not in scenes:
            scenes[cache_key] = (scene(subject, geometry) if body == "head" else
                                 pelvis_scene(geometry, np.random.default_rng(index)))
        acquired = scenes[cache_key]
        volumes[role] = acquire(acquired, subject, site, role, protocols[role], gain,
                                noise_rng, protocols["t1w"], artefacts)
        geometries[role] = geometry
        datasets[role] = series_datasets(volumes[role], geometry, site, role,
                                         protocols[role], info)
        synthesis.write_series(datasets[role], folder / role)
        paths[role] = str((folder / role).relative_to(out))
        if role == "t1w":
            tumour = acquired.tumour

    if tumour.any():
        write_mask_nifti(tumour, geometries["t1w"], folder / "tumour.nii.gz")
        write_mask_seg(tumour, datasets["t1w"], info, site, folder / "tumour_seg.dcm")
        paths["mask"] = str((folder / "tumour.nii.gz").relative_to(out))
        paths["seg"] = str((folder / "tumour_seg.dcm").relative_to(out))

    g = geometries["t1w"]
    voxel_ml = g.row_spacing_mm * g.column_spacing_mm * g.slice_spacing_mm / 1000.0
    volume_ml = float(tumour.sum() * voxel_ml)
    preview = None
    if with_preview:
        k = _slice_of_interest(tumour)
        centre = g.positions[k]
        preview = {
            "t1w": volumes["t1w"][k].tolist(),
            "t2w": volumes["t2w"][_nearest_slice(geometries["t2w"], centre)].tolist(),
            "ce": volumes["ce"][_nearest_slice(geometries["ce"], centre)].tolist(),
            "mask": tumour[k].astype(float).tolist(),
        }
    record_protocols = {r: {"tr_ms": round(p.tr_ms, 3), "te_ms": round(p.te_ms, 3)}
                        for r, p in protocols.items()}
    if options.dwi and body == "head":
        dwi_rng = np.random.default_rng(
            np.random.SeedSequence([options.seed, stream, index, 3]))
        record_protocols["dwi"] = _diffusion(
            folder, out, patient, site, options, slices, gain, dwi_rng, movement, artefacts,
            info, paths, misalignment)
    spec = patient.tumour
    return PatientRecord(
        patient=info.patient_id,
        institution=key,
        paths=paths,
        tumour_side=spec.side,
        tumour_volume_ml=round(volume_ml, 3),
        tumour_equivalent_diameter_mm=round(float((6 * volume_ml * 1000 / np.pi) ** (1 / 3)), 2),
        skull_base_infiltration=spec.skull_base_infiltration,
        parapharyngeal_infiltration=spec.parapharyngeal_infiltration,
        necrosis=spec.necrosis_radius_mm > 0,
        protocols=record_protocols,
        gain=round(gain, 4),
        misalignment=misalignment,
        randomized=drawn.describe() if drawn else None,
        lesions=[lesion.describe() for lesion in patient.lesions],
        preview=preview,
    )


def _diffusion(folder: Path, out: Path, patient: Patient, site: Site,
               options: SimulationOptions, slices: int, gain: float, rng: np.random.Generator,
               movement: float, artefacts: Artefacts | None, info: PatientInfo,
               paths: dict[str, str], misalignment: dict[str, list[float]]) -> dict[str, float]:
    """Acquire and write the patient's DWI and ADC series (``rng``: the DWI's own stream);
    adds their paths (and movement) to ``paths`` (and ``misalignment``) and returns the DWI
    protocol as the record keeps it."""
    protocol = diffusion.draw_protocol(site, rng)
    subject = patient
    if movement > 0:
        subject = patient.moved(rng, movement, movement / 2)
        misalignment["dwi"] = [round(float(v - w), 3) for v, w in
                               zip(subject.translation, patient.translation, strict=True)]
    geometry = diffusion.geometry(site, slices, protocol, options.matrix_scale)
    acquired = diffusion.acquire(subject, site, geometry, protocol, gain, rng, artefacts)
    for role, datasets in diffusion_datasets(acquired, site, info).items():
        synthesis.write_series(datasets, folder / role)
        paths[role] = str((folder / role).relative_to(out))
    return acquired.describe()


def _jobs(options: SimulationOptions, preview: bool) -> list[tuple[str, int, bool]]:
    fixed = [(key, i, preview and i == 1)
             for key in options.institutions
             for i in range(1, options.patients_per_institution + 1)]
    groups = random_groups(options)
    return fixed + [(groups[(i - 1) % len(groups)], i, preview and i <= len(groups))
                    for i in range(1, options.randomized + 1)]


def random_groups(options: SimulationOptions) -> list[str]:
    """The institutions randomised patients are listed under."""
    if options.random_groups == 1:
        return [options.random_name]
    return [f"{options.random_name}{k}" for k in range(1, options.random_groups + 1)]


def _run(args: tuple[Path, str, int, SimulationOptions, bool]) -> PatientRecord:
    return simulate_patient(*args)


def iterate_cohort(out: Path, options: SimulationOptions, *, preview: bool = False,
                   workers: int = 1) -> Iterator[PatientRecord]:
    """Simulate every patient (in ``workers`` processes), yielding records as they finish,
    in a fixed order (institution, then patient)."""
    jobs = [(out, key, i, options, p) for key, i, p in _jobs(options, preview)]
    if workers <= 1:
        yield from map(_run, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_run, jobs)


def write_manifest(out: Path, records: Sequence[PatientRecord]) -> Path:
    """``manifest.csv``: one row per patient and role, paths relative to the manifest."""
    path = out / MANIFEST
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for record in records:
            for role, relative in record.paths.items():
                writer.writerow([record.patient, record.institution, role, relative])
    return path


def simulate_cohort(
    out: Path,
    options: SimulationOptions,
    *,
    preview: bool = False,
    workers: int = 1,
    overwrite: bool = False,
    progress: Callable[[PatientRecord], None] | None = None,
) -> list[PatientRecord]:
    """Simulate a cohort into ``out`` and write its manifest, cohort.json and preview."""
    out = Path(out)
    check_output_directory(out, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
        records = []
        for record in iterate_cohort(out, options, preview=preview, workers=workers):
            records.append(record)
            if progress is not None:
                progress(record)
        write_manifest(out, records)
        previews = [r for r in records if r.preview is not None]
        if preview:
            write_preview(out / "preview.png", previews)
        summary = {
            "software": "vcemri simulator",
            "options": asdict(options),
            "institutions": {k: SITES[k].title for k in options.institutions} | (
                {group: "patients with randomised protocols (docs/randomized-protocols.md)"
                 for group in random_groups(options)} if options.randomized else {}),
            "patients": [{k: v for k, v in asdict(r).items() if k != "preview"}
                         for r in records],
        }
        (out / COHORT).write_text(json.dumps(summary, indent=1))
    except OSError as exc:
        raise StorageError(
            f"cannot write the cohort to {out}: {exc.strerror or exc}",
            hint="check free space and permissions",
        ) from exc
    return records


def check_output_directory(out: Path, overwrite: bool) -> None:
    """Refuse to mix a new cohort into a directory that holds something else."""
    if out.exists() and not out.is_dir():
        raise VcemriError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise VcemriError(
            f"output directory {out} is not empty", hint="choose another or pass --overwrite"
        )
