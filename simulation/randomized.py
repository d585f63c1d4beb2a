"""Randomised protocols (domain randomisation): a scanner, protocol, geometry and artefacts drawn
per patient from wide ranges, so that a model meets many more contrasts than the seven fixed
sites teach (``vcemri simulate --randomize N``).

Every patient draws its own :class:`~simulation.sites.Site` (with TR/TE fixed at the drawn
values) and :class:`RandomAnatomy`; the fixed sites are untouched. The sequence families a
cohort may draw can be restricted per role, so that a test cohort can hold families that
training never drew (e.g. train with ``--t1w-families SE,TSE,IR``, test with
``--t1w-families GRE2D,GRE3D``).

:data:`T1W_FAMILIES`, :data:`T2W_FAMILIES` and :data:`SCANNER` hold the ranges and their
sources; :func:`ranges_table` renders them as the table in docs/randomized-protocols.md.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np

from .acquisition import Artefacts
from .phantom import Patient
from .sites import Grid, PulseSequence, Role, SequenceFamily, Site

#: Field strengths the tissue table holds (simulation/tissues.py: 1.5 T and 3 T values).
FIELDS_T = (1.5, 3.0)

Span = tuple[float, float]


@dataclass(frozen=True)
class Family:
    """Ranges of one sequence family: TR, TE and TI in ms (TI per field strength: 1.5 T, 3 T),
    flip angle in degrees, echo train length, and where the ranges come from."""

    name: str
    kind: SequenceFamily
    title: str
    tr_ms: Span
    te_ms: Span
    source: str
    acquisition: Literal["2D", "3D"] = "2D"
    ti_ms: tuple[Span, Span] | None = None
    flip_deg: Span = (90.0, 90.0)
    echo_train: tuple[int, int] = (1, 1)
    fat_suppressed: bool = False
    #: slice thickness (mm) of this family's series: thin partitions for 3D
    thickness_mm: Span = (3.0, 6.0)


_SEED000 = "seed 000 Table 1"
_TEXTBOOK = "Westbrook, Roth & Talbot, MRI in Practice, 4th ed. (2011), ch. 2-5"
_VENDOR = "typical vendor head-and-neck protocols (no single source)"

T1W_FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("SE", "SE", "T1w spin echo", (400.0, 800.0), (8.0, 20.0),
           f"{_TEXTBOOK} (T1w SE: TR 300-700, TE 10-30 ms); {_SEED000} (562-739/13-17)"),
    Family("TSE", "FSE", "T1w turbo / fast spin echo", (450.0, 900.0), (7.0, 18.0),
           f"{_SEED000} (TSE 620/9.8, ETL 3); {_VENDOR}", echo_train=(2, 6)),
    Family("GRE2D", "GRE", "T1w 2D spoiled gradient echo (FLASH, T1-FFE, SPGR)",
           (150.0, 350.0), (2.0, 5.0), f"{_TEXTBOOK} (T1w spoiled GRE: large flip, short TE)",
           flip_deg=(60.0, 80.0)),
    Family("GRE3D", "GRE", "T1w 3D spoiled gradient echo (VIBE, THRIVE, LAVA, FSPGR)",
           (3.0, 10.0), (1.0, 5.0),
           f"{_SEED000} (FFE 4.8-9.4/2.4-8.0, flip 15; VIBE 3.42/1.11, flip 9; FSPGR "
           "4.3-8.0/3.0-7.0, flip 12)", acquisition="3D", flip_deg=(8.0, 20.0),
           thickness_mm=(1.5, 3.0)),
    Family("IR", "IR", "T1w inversion recovery (T1-FLAIR, T1-TIRM)", (1800.0, 2800.0),
           (8.0, 20.0), f"{_VENDOR}; TI lengthens with T1 at 3 T", echo_train=(4, 8),
           ti_ms=((700.0, 900.0), (850.0, 1100.0))),
)}

T2W_FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("TSE", "FSE", "T2w turbo / fast spin echo", (2500.0, 6000.0), (60.0, 110.0),
           f"{_SEED000} (3500-4900/50-80, 2500/74, 4200-4899/60-80); {_TEXTBOOK}",
           echo_train=(8, 24)),
    Family("TSE-FS", "FSE", "T2w TSE with fat suppression (fat saturation, SPAIR)",
           (2500.0, 6000.0), (60.0, 110.0), f"as TSE; {_VENDOR}", echo_train=(8, 24),
           fat_suppressed=True),
    Family("STIR", "STIR", "T2w short-tau inversion recovery (STIR, TIRM)", (3500.0, 7700.0),
           (30.0, 100.0),
           f"{_SEED000} (7640/97, TI 165 at 1.5 T); fat-null TI scales with fat's T1 at 3 T",
           echo_train=(8, 20), ti_ms=((140.0, 180.0), (180.0, 240.0))),
)}

FAMILIES: dict[Role, dict[str, Family]] = {"t1w": T1W_FAMILIES, "t2w": T2W_FAMILIES}


@dataclass(frozen=True)
class Parameter:
    """One randomised scanner, geometry or anatomy parameter: its range and source."""

    name: str
    low: float
    high: float
    unit: str
    source: str
    #: the range as the table shows it, when low-high would mislead
    shown: str = ""


SCANNER: dict[str, Parameter] = {p.name: p for p in (
    Parameter("field strength", 1.5, 3.0, "T", "the two fields the tissue table holds "
              "(Stanisz 2005; de Bazelaire 2004)", shown="1.5 or 3, half each"),
    Parameter("brightest tissue, stored value", 250.0, 0.9, "stored units, log-uniform",
              "seed 001 Fig. 1 (intensity scales differ several-fold between sites); vendors "
              "scale so that nothing clips", shown="250 to 0.9 x the largest storable value"),
    Parameter("RescaleSlope (written by 40 %)", 0.5, 4.0, "", "Philips writes one (seed 000 "
              "notes Hospital 2's small stored values); the fixed sites use 1.6 and 2.4"),
    Parameter("signed pixels (PixelRepresentation 1)", 0.0, 0.3, "probability",
              "GE writes signed pixels (fixed site inst4)"),
    Parameter("bits stored", 12, 16, "bits", "older Siemens store 12", shown="12 or 16, "
              "half each"),
    Parameter("field of view", 200.0, 260.0, "mm", f"{_SEED000} (230 mm at 256 x 0.9 mm); "
              f"{_VENDOR}"),
    Parameter("matrix", 192, 512, "pixels", f"{_SEED000} (256-320); {_VENDOR}",
              shown="rows 192-512 (steps of 32 to 64), columns 75-100 % of rows"),
    Parameter("slice gap (2D)", 0.0, 0.25, "of the thickness", f"{_SEED000} (0-10 %)"),
    Parameter("T2w on its own grid", 0.0, 0.4, "probability",
              "fixed site inst1 (T2w at 320 x 0.72 mm beside a 256 x 0.9 mm T1w); the same "
              "field of view and slab, its own matrix and slice thickness"),
    Parameter("oblique tilt", -15.0, 15.0, "degrees", "issue 15 (oblique axial up to 15)"),
    Parameter("Rician noise", 0.01, 0.06, "of the mean head signal",
              "fixed sites 0.02-0.04, widened both ways"),
    Parameter("receive bias, peak to peak", 0.05, 0.45, "", "fixed sites 0.10-0.25; 3 T "
              "head-and-neck coils up to 40 % (widened)"),
    Parameter("post-contrast series is a 3D GRE", 0.0, 0.2, "probability",
              f"{_SEED000} Hospital 3 (VIBE after a TSE T1w); otherwise the T1w's sequence"),
)}

ANATOMY: dict[str, Parameter] = {p.name: p for p in (
    Parameter("head size", 0.88, 1.12, "x the canonical head", "adult head breadth +-12 % "
              "(the fixed sites: +-4 % SD)"),
    Parameter("neck length", 0.9, 1.15, "x the canonical head-to-foot extent", _VENDOR),
    Parameter("dental artefact (a filling or crown)", 0.0, 0.3, "probability", "common in "
              "head-and-neck MR of adults; radius 6-16 mm, 1.6x wider on gradient echoes"),
    Parameter("motion ghosts", 0.0, 0.3, "probability", "swallowing and breathing; 2-8 % "
              "of the signal at 20-45 % of the matrix along the phase-encoding direction"),
    Parameter("movement between series", 0.0, 2.0, "mm (and half as many degrees)",
              "seed 000 FIG. 10 (unregistered hospital data)"),
)}


@dataclass(frozen=True)
class RandomAnatomy:
    """What a randomised patient adds to the phantom's own variation: head size and neck
    length factors, artefacts, and rigid movement between series (mm)."""

    head_scale: float
    neck_scale: float
    artefacts: Artefacts
    movement_mm: float

    def apply(self, patient: Patient) -> Patient:
        """The patient with this head size and neck length."""
        x, y, z = patient.scale
        return replace(patient, scale=(x * self.head_scale, y * self.head_scale,
                                       z * self.head_scale * self.neck_scale))


@dataclass(frozen=True)
class RandomDraw:
    """One randomised patient's scanner, protocol and anatomy, and the families drawn."""

    site: Site
    anatomy: RandomAnatomy
    families: dict[str, str]

    def describe(self) -> dict[str, object]:
        """JSON-serializable summary for cohort.json."""
        site = self.site
        grid = site.grid

        def sequence(role: Role) -> dict[str, object]:
            seq = site.sequence(role)
            out: dict[str, object] = {"kind": seq.kind, "description": seq.description,
                                      "acquisition": seq.acquisition,
                                      "flip_deg": round(seq.flip_deg, 1),
                                      "echo_train_length": seq.echo_train_length,
                                      "fat_suppressed": seq.fat_suppressed}
            if seq.ti_ms is not None:
                out["ti_ms"] = round(seq.ti_ms, 1)
            return out

        artefacts = self.anatomy.artefacts
        return {
            "families": self.families, "manufacturer": site.manufacturer,
            "field_t": site.field_t, "t1w": sequence("t1w"), "t2w": sequence("t2w"),
            "ce": sequence("ce"), "grid": asdict(grid),
            "t2w_grid": asdict(site.t2w_grid) if site.t2w_grid else None,
            "intensity_scale": round(site.intensity_scale, 2), "rescale": site.rescale,
            "pixel_representation": site.pixel_representation,
            "bits_stored": site.bits_stored, "tilt_deg": round(site.tilt_deg, 2),
            "noise": round(site.noise, 4), "bias": round(site.bias, 3),
            "head_scale": round(self.anatomy.head_scale, 3),
            "neck_scale": round(self.anatomy.neck_scale, 3),
            "dental_radius_mm": round(artefacts.dental_radius_mm, 1),
            "ghost_fraction": round(artefacts.ghost_fraction, 3),
            "movement_mm": round(self.anatomy.movement_mm, 2),
        }


#: How each vendor names a family's series (SeriesDescription, SequenceName).
_VENDORS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "SIEMENS": ("MAGNETOM Sim", {
        "SE": ("t1_se_tra", "*se2d1"), "TSE": ("t1_tse_tra", "*tse2d1_3"),
        "GRE2D": ("t1_fl2d_tra", "*fl2d1"), "GRE3D": ("t1_vibe_tra", "*fl3d1"),
        "IR": ("t1_tirm_tra", "*tir2d1_5"), "T2:TSE": ("t2_tse_tra", "*tse2d1_15"),
        "T2:TSE-FS": ("t2_tse_fs_tra", "*tse2d1_15"), "T2:STIR": ("t2_tirm_tra", "*tir2d1_15"),
    }),
    "GE MEDICAL SYSTEMS": ("SIGNA Sim", {
        "SE": ("AX T1 SE", "se"), "TSE": ("AX T1 FSE", "fse"),
        "GRE2D": ("AX T1 SPGR", "spgr"), "GRE3D": ("AX T1 LAVA", "efgre3d"),
        "IR": ("AX T1 FLAIR", "fse_ir"), "T2:TSE": ("AX T2 FRFSE", "frfse"),
        "T2:TSE-FS": ("AX T2 FS", "frfse"), "T2:STIR": ("AX STIR", "fse_ir"),
    }),
    "Philips Healthcare": ("Ingenia Sim", {
        "SE": ("T1W_SE", "SE"), "TSE": ("T1W_TSE", "TSE"), "GRE2D": ("T1W_FFE", "FFE"),
        "GRE3D": ("T1W_THRIVE", "T1FFE"), "IR": ("T1W_IR", "IR"), "T2:TSE": ("T2W_TSE", "TSE"),
        "T2:TSE-FS": ("T2W_SPAIR", "TSE"), "T2:STIR": ("T2W_STIR", "TSE"),
    }),
    "CANON_MEC": ("Vantage Sim", {
        "SE": ("T1 SE AX", "SE"), "TSE": ("T1 FSE AX", "FSE"), "GRE2D": ("T1 FFE AX", "FE"),
        "GRE3D": ("T1 3D FFE AX", "FE3D"), "IR": ("T1 FLAIR AX", "IR"),
        "T2:TSE": ("T2 FSE AX", "FSE"), "T2:TSE-FS": ("T2 FSE FS AX", "FSE"),
        "T2:STIR": ("STIR AX", "IR"),
    }),
}


def _uniform(rng: np.random.Generator, span: Span) -> float:
    return float(rng.uniform(*span))


def _sequence(family: Family, role_key: str, vendor: dict[str, tuple[str, str]],
              field_t: float, rng: np.random.Generator, post: bool = False) -> PulseSequence:
    tr, te = round(_uniform(rng, family.tr_ms), 2), round(_uniform(rng, family.te_ms), 2)
    ti = None
    if family.ti_ms is not None:
        ti = round(_uniform(rng, family.ti_ms[FIELDS_T.index(field_t)]), 1)
    description, name = vendor[role_key]
    return PulseSequence(
        family.kind, description + ("_post" if post else ""), (tr, tr), (te, te), ti_ms=ti,
        flip_deg=round(_uniform(rng, family.flip_deg), 1),
        echo_train_length=int(rng.integers(family.echo_train[0], family.echo_train[1] + 1)),
        acquisition=family.acquisition, sequence_name=name,
        fat_suppressed=family.fat_suppressed)


def _grid(family: Family, rng: np.random.Generator, fov: float | None = None) -> Grid:
    """A matrix, pixel spacing and slice thickness for this family; ``fov`` (mm) keeps another
    series' field of view, as one exam's series share it."""
    fov = fov or _uniform(rng, (SCANNER["field of view"].low, SCANNER["field of view"].high))
    rows = int(rng.choice((192, 224, 256, 288, 320, 384, 448, 512)))
    columns = int(16 * round(rows * rng.uniform(0.75, 1.0) / 16))
    spacing = round(fov / rows, 4)
    thickness = round(_uniform(rng, family.thickness_mm), 2)
    gap = 0.0 if family.acquisition == "3D" else round(
        thickness * _uniform(rng, (0.0, SCANNER["slice gap (2D)"].high)), 2)
    return Grid(rows, columns, spacing, spacing, thickness, gap)


def check_families(families: Mapping[Role, Sequence[str]]) -> None:
    """Raise ``ValueError`` naming the known families if one is unknown or a role has none."""
    for role, names in families.items():
        known = FAMILIES[role]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ValueError(f"unknown {role} sequence famil{'ies' if len(unknown) > 1 else 'y'} "
                             f"{', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")


def draw(name: str, index: int, rng: np.random.Generator,
         families: Mapping[Role, Sequence[str]] | None = None) -> RandomDraw:
    """Draw patient ``index``'s scanner, protocol, geometry and anatomy variation from the
    ranges above, the T1w and T2w families restricted to ``families`` (default: all)."""
    allowed = {role: tuple((families or {}).get(role) or FAMILIES[role]) for role in FAMILIES}
    check_families(allowed)
    field_t = float(rng.choice(FIELDS_T))
    manufacturer = str(rng.choice(list(_VENDORS)))
    model, naming = _VENDORS[manufacturer]
    t1_name = str(rng.choice(allowed["t1w"]))
    t2_name = str(rng.choice(allowed["t2w"]))
    t1_family, t2_family = T1W_FAMILIES[t1_name], T2W_FAMILIES[t2_name]
    t1w = _sequence(t1_family, t1_name, naming, field_t, rng)
    t2w = _sequence(t2_family, f"T2:{t2_name}", naming, field_t, rng)
    ce_name = t1_name
    ce = replace(t1w, description=t1w.description + (" +C" if " " in t1w.description
                                                     else "_post"))
    if (t1_name != "GRE3D" and "GRE3D" in allowed["t1w"]
            and rng.random() < SCANNER["post-contrast series is a 3D GRE"].high):
        ce_name = "GRE3D"
        ce = _sequence(T1W_FAMILIES["GRE3D"], "GRE3D", naming, field_t, rng, post=True)
    grid = _grid(t1_family, rng)
    t2w_grid = None
    if rng.random() < SCANNER["T2w on its own grid"].high:
        t2w_grid = _grid(t2_family, rng, fov=grid.rows * grid.row_spacing_mm)
    bits = int(rng.choice((12, 16)))
    signed = bool(rng.random() < SCANNER["signed pixels (PixelRepresentation 1)"].high)
    slope = None
    if rng.random() < 0.4:
        slope = round(float(np.exp(rng.uniform(np.log(0.5), np.log(4.0)))), 3)
    top = 2 ** (bits - (1 if signed else 0)) - 1
    brightest = SCANNER["brightest tissue, stored value"]
    stored = float(np.exp(rng.uniform(np.log(brightest.low), np.log(brightest.high * top))))
    # The brightest tissue (fat, ~1 in PD units, times up to 1.25 of bias and gain) lands at
    # ``stored``: vendors scale so that nothing clips.
    intensity_scale = stored * (slope or 1.0) / 1.25
    site = Site(
        key=name, title=f"Randomised protocol {name}-{index:03d}",
        manufacturer=manufacturer, model=model, field_t=field_t,
        institution_name=f"Simulated randomised site {name}",
        station_name=f"SIMRAND{index:03d}", t1w=t1w, t2w=t2w, ce=ce, grid=grid,
        t2w_grid=t2w_grid, intensity_scale=intensity_scale,
        noise=_uniform(rng, (SCANNER["Rician noise"].low, SCANNER["Rician noise"].high)),
        bias=_uniform(rng, (SCANNER["receive bias, peak to peak"].low,
                            SCANNER["receive bias, peak to peak"].high)),
        rescale=(slope, 0.0) if slope else None, pixel_representation=1 if signed else 0,
        bits_stored=bits, slice_order="descending" if rng.random() < 0.5 else "ascending",
        tilt_deg=_uniform(rng, (SCANNER["oblique tilt"].low, SCANNER["oblique tilt"].high)),
        external=True,
    )
    dental = rng.random() < ANATOMY["dental artefact (a filling or crown)"].high
    ghosts = rng.random() < ANATOMY["motion ghosts"].high
    artefacts = Artefacts(
        dental_centre_mm=(float(rng.uniform(-25, 25)), float(rng.uniform(-65, -50)),
                          float(rng.uniform(-40, -22))) if dental else None,
        dental_radius_mm=float(rng.uniform(6.0, 16.0)) if dental else 0.0,
        ghost_fraction=float(rng.uniform(0.02, 0.08)) if ghosts else 0.0,
        ghost_shift=float(rng.uniform(0.2, 0.45)),
    )
    anatomy = RandomAnatomy(
        head_scale=_uniform(rng, (ANATOMY["head size"].low, ANATOMY["head size"].high)),
        neck_scale=_uniform(rng, (ANATOMY["neck length"].low, ANATOMY["neck length"].high)),
        artefacts=artefacts,
        movement_mm=_uniform(rng, (0.0, ANATOMY["movement between series"].high)),
    )
    return RandomDraw(site, anatomy, {"t1w": t1_name, "t2w": t2_name, "ce": ce_name})


def stream_key(name: str) -> int:
    """A stable number for a randomised cohort's name: its patients' random streams are
    ``SeedSequence([seed, stream_key(name), index])``, apart from every fixed site's."""
    return 1000 + zlib.crc32(name.encode()) % 1_000_000


def ranges_table() -> str:
    """The ranges as the Markdown of docs/randomized-protocols.md."""
    lines = [
        "# Randomised protocols",
        "",
        "`vcemri simulate --randomize N` adds N patients, each with its own scanner, protocol,",
        "geometry and artefacts drawn uniformly from these ranges (simulation/randomized.py;",
        "this page is generated from it by `python -m simulation.randomized`). The seven fixed",
        "sites are unchanged. `--t1w-families` and `--t2w-families` restrict the families drawn,",
        "so a test cohort can hold families training never saw.",
        "",
        "## Sequence families",
        "",
        "| role | family | sequence | TR (ms) | TE (ms) | TI (ms) at 1.5 T / 3 T | flip (deg) "
        "| echo train | slice (mm) | source |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def span(values: Span, digits: int = 0) -> str:
        low, high = values
        return f"{low:.{digits}f}" if low == high else f"{low:.{digits}f}-{high:.{digits}f}"

    for role, families in FAMILIES.items():
        for family in families.values():
            ti = " / ".join(span(s) for s in family.ti_ms) if family.ti_ms else "-"
            lines.append(
                f"| {role} | {family.name} | {family.title} | {span(family.tr_ms)} | "
                f"{span(family.te_ms)} | {ti} | {span(family.flip_deg)} | "
                f"{span(family.echo_train)} | {span(family.thickness_mm, 1)} | "
                f"{family.source} |")
    lines += ["", "The post-contrast series repeats the T1w's sequence, except that 20 % of "
              "patients get a 3D GRE", "after a T1w of another family (when GRE3D is allowed).",
              "", "## Scanner, geometry and anatomy", "",
              "| parameter | range | unit | source |", "|---|---|---|---|"]
    for parameter in (*SCANNER.values(), *ANATOMY.values()):
        shown = parameter.shown or f"{parameter.low:g}-{parameter.high:g}"
        lines.append(f"| {parameter.name} | {shown} | {parameter.unit} | {parameter.source} |")
    lines += ["", "Probabilities are written as 0-p. Manufacturers (Siemens, GE, Philips, "
              "Canon) are drawn with", "equal weight and name their series as they do on "
              "their scanners (e.g. t1_vibe_tra, AX T1 LAVA).", "Lower fields (0.55 T, 1 T) "
              "are not drawn: the tissue table holds 1.5 T and 3 T values only.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(ranges_table(), end="")
