"""Training data: a manifest of patients (T1w, T2w, CE-T1w series; optional tumour mask),
checked as a whole, preprocessed once exactly as the synthesis pipeline preprocesses a study,
and cached as memory-mapped slices so epochs never decode DICOM again.

Manifests, paths relative to the manifest; each series a DICOM folder or an image file
(NIfTI ``.nii``/``.nii.gz``, NRRD, MetaImage); ``mask`` (optional) a tumour label image:

- CSV, one row per series: ``patient,institution,role,path`` with roles ``t1w``, ``t2w``,
  ``ce`` (required), ``mask``, ``dwi`` and ``adc`` (the simulator's ``manifest.csv``; other
  roles are ignored);
- CSV, one row per patient: ``patient,institution,t1w,t2w,ce[,mask]``;
- YAML (``.yaml``/``.yml``): a list of mappings with those keys, or ``patients:`` holding one.

A broken manifest is refused with every problem listed.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import synthesis
from config import InputError, VcemriError

REQUIRED_ROLES = ("t1w", "t2w", "ce")


@dataclass(frozen=True)
class PatientEntry:
    """One patient of a manifest."""

    patient: str
    institution: str
    paths: dict[str, Path]


#: Inputs a manifest may add for models trained with them (seed 003; the simulator's --dwi).
OPTIONAL_INPUTS = ("dwi", "adc")

PER_PATIENT = ("t1w", "t2w", "ce", "mask", *OPTIONAL_INPUTS)


def _csv_records(path: Path) -> list[tuple[str, dict[str, str]]]:
    """(where, {patient, institution, role, path}) for each series of a CSV manifest."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"manifest {path} is not UTF-8 text ({exc.reason})") from None
    if not lines:
        return []
    reader = csv.DictReader(lines)
    columns = set(reader.fieldnames or [])
    per_series = {"patient", "institution", "role", "path"}
    wide = {"patient", "institution", *REQUIRED_ROLES}
    if not per_series <= columns and not wide <= columns:
        raise InputError(f"manifest {path} needs the columns patient,institution,role,path (a "
                         "row per series) or patient,institution,t1w,t2w,ce[,mask] (a row per "
                         f"patient); it has {','.join(reader.fieldnames or []) or 'none'}")
    records = []
    for number, row in enumerate(reader, start=2):
        if per_series <= columns:
            records.append((f"line {number}", {k: row.get(k) or "" for k in per_series}))
            continue
        for role in PER_PATIENT:
            if role in REQUIRED_ROLES or (row.get(role) or "").strip():
                records.append((f"line {number}", {"patient": row.get("patient") or "",
                                                   "institution": row.get("institution") or "",
                                                   "role": role, "path": row.get(role) or ""}))
    return records


def _yaml_records(path: Path, problems: list[str]) -> list[tuple[str, dict[str, str]]]:
    """The same records from a YAML manifest (a list of patients, or ``patients:``)."""
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"manifest {path} is not readable YAML ({exc})") from None
    if isinstance(document, dict) and "patients" in document:
        document = document["patients"]
    if not isinstance(document, list):
        raise InputError(f"manifest {path}: expected a list of patients (or 'patients:' "
                         "holding one), each with patient, institution, t1w, t2w, ce[, mask]")
    records = []
    for number, item in enumerate(document, start=1):
        where = f"patient entry {number}"
        if not isinstance(item, dict):
            problems.append(f"{where}: not a mapping of patient, institution, t1w, t2w, ce")
            continue
        unknown = sorted(set(map(str, item)) - {"patient", "institution", *PER_PATIENT})
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)}")
        for role in PER_PATIENT:
            if role in REQUIRED_ROLES or item.get(role):
                records.append((where, {"patient": str(item.get("patient") or ""),
                                        "institution": str(item.get("institution") or ""),
                                        "role": role, "path": str(item.get(role) or "")}))
    return records


def read_manifest(path: Path) -> list[PatientEntry]:
    """The patients of a manifest; raises :class:`InputError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist")
    problems: list[str] = []
    rows: dict[str, dict[str, Path]] = defaultdict(dict)
    institutions: dict[str, str] = {}
    records = (_yaml_records(path, problems) if path.suffix.lower() in (".yaml", ".yml")
               else _csv_records(path))
    for where, record in records:
        values = {k: record[k].strip() for k in ("patient", "institution", "role", "path")}
        empty = [k for k, v in values.items() if not v]
        if empty:
            problems.append(f"{where}: no {', '.join(empty)}")
            continue
        patient, role = values["patient"], values["role"]
        target = (path.parent / values["path"]).resolve()
        if role in rows[patient]:
            problems.append(f"{where}: patient {patient} has a second {role}")
        if not target.exists():
            problems.append(f"{where}: {values['path']} does not exist")
        rows[patient][role] = target
        if institutions.setdefault(patient, values["institution"]) != values["institution"]:
            problems.append(f"{where}: patient {patient} is listed at two institutions")
    for patient, roles in rows.items():
        absent = [r for r in REQUIRED_ROLES if r not in roles]
        if absent:
            problems.append(f"patient {patient} has no {', '.join(absent)}")
    if not rows:
        problems.append("the manifest lists no patients")
    if problems:
        raise InputError(f"manifest {path}: {len(problems)} problem(s): " + "; ".join(problems))
    return [PatientEntry(p, institutions[p], roles) for p, roles in sorted(rows.items())]


@dataclass
class PreparedPatient:
    """One patient preprocessed for training (arrays live in the cache)."""

    patient: str
    institution: str
    slices: int
    means: dict[str, float]  # head mean per modality, scanner units (EDM statistics)
    header: dict[str, object] = field(default_factory=dict)  # for institution profiles


class SliceCache:
    """Memory-mapped model-grid slices of every patient: inputs (N, C, H, W) float16 (the
    channels are :attr:`roles`: T1w and T2w, then any further input a model trains on) and
    targets (N, H, W) float16, with the index of each patient's slices."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.patients = [PreparedPatient(**p) for p in index["patients"]]
        self.offsets = index["offsets"]
        self.inputs = np.load(self.folder / "inputs.npy", mmap_mode="r")
        self.targets = np.load(self.folder / "targets.npy", mmap_mode="r")
        self.normalization = index["normalization"]
        #: the grid the slices are on (the seeds' 256 x 224 matrix, or a fixed spacing's
        #: canvas): what a model trained on them records
        grid = index.get("grid", {})
        self.grid = synthesis.GridPolicy(grid.get("rows", synthesis.MODEL_GRID[0]),
                                         grid.get("columns", synthesis.MODEL_GRID[1]),
                                         grid.get("spacing_mm"))
        #: the input channels, in order
        self.roles: tuple[str, ...] = tuple(index.get("roles", ("t1w", "t2w")))
        #: dataset-level normalization's statistics per modality ({} at other levels)
        self.dataset_statistics = {role: synthesis.Statistics(**values) for role, values in
                                   index.get("dataset_statistics", {}).items()}

    def rows(self, patients: set[str]) -> np.ndarray:
        """Slice indices of the given patients."""
        parts = [np.arange(self.offsets[i], self.offsets[i] + p.slices)
                 for i, p in enumerate(self.patients) if p.patient in patients]
        return np.concatenate(parts) if parts else np.zeros(0, int)


#: Bumped when what a cache holds or how it is preprocessed changes (3: smoothed head masks),
#: so that an older cache is never reused. (The grid policy is part of the key.)
CACHE_FORMAT = 3


def _key(entries: list[PatientEntry], normalization: synthesis.Normalization,
         dataset: Mapping[str, synthesis.Statistics] | None = None,
         extra: tuple[str, ...] = (), grid: str = "") -> str:
    digest = hashlib.sha256()
    if grid:
        digest.update(f"grid|{grid}".encode())
    for entry in entries:
        for role in sorted(entry.paths):
            folder = entry.paths[role]
            files = sorted(folder.rglob("*")) if folder.is_dir() else [folder]
            stamp = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]
            digest.update(f"{entry.patient}|{entry.institution}|{role}|{stamp}".encode())
    digest.update(f"{normalization.method}|{normalization.level}|{CACHE_FORMAT}".encode())
    for role, stats in sorted((dataset or {}).items()):
        digest.update(f"{role}|{stats.as_dict()}".encode())
    if extra:
        digest.update(f"inputs|{extra}".encode())
    return digest.hexdigest()[:16]


def _load(entry: PatientEntry, extra: tuple[str, ...] = ()) -> tuple[
        dict[str, synthesis.Volume], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One patient's series (checked to be one study), the T2w, CE and ``extra`` inputs
    (DWI, ...) resampled onto the T1w, background removed as the pipeline removes it:
    (volumes, clean arrays, head masks); InputError names what is wrong."""
    missing = [role for role in extra if role not in entry.paths]
    if missing:
        raise InputError(f"the manifest gives it no {', '.join(missing)} series, which the "
                         "model is trained on")
    roles = (*REQUIRED_ROLES, *extra)
    volumes = {role: synthesis.read_volume(entry.paths[role]) for role in roles}
    # image files carry no identity to compare: the manifest vouches for them
    if not any(synthesis.is_image_file(entry.paths[r]) for r in roles):
        for role in roles[1:]:
            synthesis.check_pair(volumes["t1w"], volumes[role],
                                 synthesis.INPUT_NAMES.get(role, role.upper()))
    for role in roles[1:]:
        covered = synthesis.field_overlap(volumes["t1w"], volumes[role])
        if covered < synthesis.MIN_OVERLAP:
            raise InputError(
                f"its {role} covers {covered:.0%} of the T1w's field of view (at least "
                f"{synthesis.MIN_OVERLAP:.0%} needed): the series do not show the same "
                "anatomy in the same place; check their geometry")
    t1 = volumes["t1w"]
    arrays = {"t1w": np.asarray(t1.array, np.float32)}
    for role in roles[1:]:
        arrays[role] = np.asarray(synthesis.resample_onto(volumes[role], t1).array, np.float32)
    ce = arrays.pop("ce")
    clean, masks = synthesis.clean_inputs(arrays)
    if not masks["t1w"].any():
        raise InputError("no head found in the T1w (empty foreground)")
    masks["ce"] = masks["t1w"]
    clean["ce"] = synthesis.remove_background(ce, masks["ce"])
    return volumes, clean, masks


def _each_patient(entries: list[PatientEntry], extra: tuple[str, ...] = ()) -> Iterator[
        tuple[PatientEntry, dict[str, synthesis.Volume], dict[str, np.ndarray],
              dict[str, np.ndarray]]]:
    """Every usable patient of ``entries``, loaded (:func:`_load`); once all are read, raises
    InputError naming every patient that cannot be used."""
    problems = []
    for entry in entries:
        try:
            volumes, clean, masks = _load(entry, extra)
        except VcemriError as exc:
            problems.append(f"patient {entry.patient}: {exc}")
            continue
        yield entry, volumes, clean, masks
    if problems:
        raise InputError(f"{len(problems)} patient(s) cannot be used: " + "; ".join(problems))


def tumour_mask(path: Path | None, reference: Any) -> np.ndarray | None:
    """A manifest's tumour mask resampled (nearest neighbour) onto ``reference`` (the T1w's
    SimpleITK image), as a (slices, rows, columns) boolean array; None without a mask."""
    import SimpleITK as sitk

    if path is None or not Path(path).is_file():
        return None
    mask = sitk.Resample(sitk.ReadImage(str(path)), reference, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(mask) > 0


def grid_tumour_masks(entries: list[PatientEntry], cache: SliceCache) -> np.ndarray:
    """Every cache row's tumour mask on the cache's grid, (rows, H, W) boolean: the manifest's
    masks taken onto each patient's T1w, then to the grid as the pipeline takes a head mask
    (all False for a patient without a mask)."""
    by_patient = {e.patient: e for e in entries}
    masks = np.zeros(cache.targets.shape, bool)
    for offset, prepared in zip(cache.offsets, cache.patients, strict=True):
        entry = by_patient.get(prepared.patient)
        if entry is None or "mask" not in entry.paths:
            continue
        t1 = synthesis.read_volume(entry.paths["t1w"])
        found = tumour_mask(entry.paths["mask"], t1.image)
        if found is not None and found.any():
            spacing = t1.image.GetSpacing()
            placement = cache.grid.place(found.shape, (spacing[1], spacing[0]), grow=False)
            masks[offset:offset + prepared.slices] = synthesis.mask_to_canvas(found, placement)
    return masks


def dataset_statistics(entries: list[PatientEntry], inputs: tuple[str, ...] = ("t1w", "t2w")
                       ) -> dict[str, synthesis.Statistics]:
    """Head intensity statistics of T1w, T2w (and any further ``inputs``) over every patient
    of ``entries`` (the training patients), pooled by voxel count: what dataset-level
    normalization (seed 001) divides by, stored in the model."""
    if not entries:
        raise InputError("dataset-level normalization needs training patients")
    roles = _roles(inputs)
    parts: dict[str, list[synthesis.Statistics]] = {r: [] for r in roles}
    counts: dict[str, list[float]] = {r: [] for r in roles}
    for _, _, clean, masks in _each_patient(entries, roles[2:]):
        for role in parts:
            parts[role].append(synthesis.Statistics.of(clean[role][masks[role]]))
            counts[role].append(float(masks[role].sum()))
    return {role: synthesis.Statistics.pooled(parts[role], counts[role]) for role in parts}


def _roles(inputs: tuple[str, ...]) -> tuple[str, ...]:
    """The cache's input channels for a model reading ``inputs``: T1w and T2w always (the
    fitness classifier, OOD calibration and metrics read them), then the others."""
    return ("t1w", "t2w", *(r for r in inputs if r not in ("t1w", "t2w")))


def prepare(entries: list[PatientEntry], cache_root: Path,
            normalization: synthesis.Normalization, progress=None,
            dataset: Mapping[str, synthesis.Statistics] | None = None,
            inputs: tuple[str, ...] = ("t1w", "t2w"),
            grid: synthesis.GridPolicy | float | None = None) -> SliceCache:
    """Preprocess every patient once (reused while the inputs are unchanged); ``dataset``:
    the training set's statistics (:func:`dataset_statistics`), for dataset-level
    normalization; ``inputs``: the series the model reads (T1w and T2w are always kept);
    ``grid``: the network's grid (None: the seeds' 256 x 224 matrix; a policy: a model's, its
    canvas kept and wider fields cropped; a spacing in mm: that spacing on a canvas that holds
    every patient's field of view, which the cache's :attr:`SliceCache.grid` records)."""
    if normalization.level == "dataset" and dataset is None:
        raise ValueError("dataset-level normalization needs the training set's statistics")
    roles = _roles(tuple(inputs))
    policy = grid if isinstance(grid, synthesis.GridPolicy) else None
    spacing = None if grid is None or policy is not None else float(grid)  # type: ignore[arg-type]
    key = "" if grid is None or policy == synthesis.GridPolicy() else (
        f"{spacing} mm, fitted" if policy is None else str(policy))
    folder = Path(cache_root) / _key(entries, normalization, dataset, roles[2:], key)
    if (folder / "index.json").exists():
        return SliceCache(folder)
    policy = policy or synthesis.GridPolicy()
    prepared: list[tuple[tuple[np.ndarray, np.ndarray], np.ndarray]] = []
    patients, offsets = [], []
    total = 0
    for entry, volumes, clean, masks in _each_patient(entries, roles[2:]):
        t1 = volumes["t1w"]
        stats = {role: normalization.statistics(clean[role], masks[role],
                                                (dataset or {}).get(role))
                 for role in roles}
        normalized = {role: normalization.normalize_volume(clean[role], stats[role])
                      for role in roles}
        target = normalization.normalize_volume(clean["ce"], stats["t1w"], target=True)
        # the normalised background each channel is padded with (a removed voxel is 0)
        fills = np.array([[normalization.background(stats[r][k]) for r in roles]
                          + [normalization.background(stats["t1w"][k], target=True)]
                          for k in range(len(target))], np.float32)
        sitk_spacing = t1.image.GetSpacing()
        pixel = (sitk_spacing[1], sitk_spacing[0])
        stacked = np.stack([normalized[r] for r in roles], 1)
        if spacing is None:
            placement = policy.place(target.shape, pixel, grow=False)
        else:  # resampled now, centred once the canvas that holds every patient is known
            inner = synthesis.GridPolicy(spacing_mm=spacing).place(target.shape, pixel,
                                                                   grow=False).inner
            placement = synthesis.Placement(*target.shape[-2:], inner, inner)
        prepared.append(((synthesis.to_canvas(stacked, placement, fills[:, :-1]).numpy(),
                          synthesis.to_canvas(target, placement, fills[:, -1]).numpy()),
                         fills))
        info = t1.info
        patients.append(PreparedPatient(
            entry.patient, entry.institution, len(target),
            {role: float(clean[role][masks[role]].mean()) for role in ("t1w", "t2w")},
            {"manufacturer": info.manufacturer, "model": info.model,
             "field_strength_t": info.field_strength_t, "institution_name": info.institution_name,
             "station_name": info.station_name,
             "t1w_tr": info.repetition_time_ms, "t1w_te": info.echo_time_ms,
             "t2w_tr": volumes["t2w"].info.repetition_time_ms,
             "t2w_te": volumes["t2w"].info.echo_time_ms,
             "slice_spacing_mm": float(sitk_spacing[2]),
             "pixel_spacing_mm": float(min(sitk_spacing[:2]))}))
        offsets.append(total)
        total += len(target)
        if progress is not None:
            progress(entry.patient)
    if spacing is not None and prepared:
        policy = synthesis.GridPolicy.fitting(spacing, [
            (target.shape[-2] * spacing, target.shape[-1] * spacing)
            for (_, target), _ in prepared])
    inputs_out, targets_out = [], []
    for (stacked, target), fills in prepared:
        placement = synthesis.Placement(*target.shape[-2:], target.shape[-2:], policy.canvas) \
            if spacing is not None else None
        if placement is not None:
            stacked = synthesis.to_canvas(stacked, placement, fills[:, :-1]).numpy()
            target = synthesis.to_canvas(target, placement, fills[:, -1]).numpy()
        inputs_out.append(stacked.astype(np.float16))
        targets_out.append(target.astype(np.float16))
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "inputs.npy", np.concatenate(inputs_out))
    np.save(folder / "targets.npy", np.concatenate(targets_out))
    (folder / "index.json").write_text(json.dumps({
        "patients": [p.__dict__ for p in patients], "offsets": offsets,
        "normalization": {"method": normalization.method, "level": normalization.level},
        "roles": list(roles),
        "grid": {"rows": policy.rows, "columns": policy.columns,
                 "spacing_mm": policy.spacing_mm},
        "dataset_statistics": {role: stats.as_dict()
                               for role, stats in (dataset or {}).items()}}))
    return SliceCache(folder)
