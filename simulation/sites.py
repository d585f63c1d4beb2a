"""The site catalogue: scanner, pulse sequences, geometry, intensity scale, noise and DICOM
header conventions of each institution the simulator can play (not to be confused with
``synthesis.institutions``, which recognizes a study's institution from its headers).

``inst1``-``inst4`` are seed 000 Table 1 (Hospital 1 Siemens 1.5 T, Hospital 2 Philips 3 T,
Hospital 3 Siemens 3 T, Hospital 4 GE 3 T) with its TR/TE ranges; ``inst5``-``inst7`` are
external sites with other vendors or field strengths, in the spirit of seed 001's seven
institutions. Intensity scales differ several-fold between sites, as seed 001 Fig. 1 shows;
seed 000 notes that Hospital 2's intensities are the smallest.

Where the seeds are silent (flip angles, matrices of sites 2-7, noise, bias), values are
typical of clinical head-and-neck protocols on those scanners.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: SE and FSE (turbo spin echo), spoiled gradient echo, STIR, and IR: a T1-weighted inversion
#: recovery (T1-FLAIR), whose long TI nulls nothing but lengthens the T1 contrast.
SequenceFamily = Literal["SE", "FSE", "GRE", "STIR", "IR"]
Role = Literal["t1w", "t2w", "ce"]
ROLES: tuple[Role, ...] = ("t1w", "t2w", "ce")
#: The opt-in diffusion series (``vcemri simulate --dwi``, simulation/diffusion.py): the DWI
#: (b = 0 and 1000 s/mm^2 in one series) and its ADC map; never part of the loop over ROLES.
DiffusionRole = Literal["dwi", "adc"]


@dataclass(frozen=True)
class PulseSequence:
    """One pulse sequence; TR and TE are drawn per patient from their (low, high) ranges (ms)."""

    kind: SequenceFamily
    description: str
    tr_ms: tuple[float, float]
    te_ms: tuple[float, float]
    ti_ms: float | None = None
    flip_deg: float = 90.0
    echo_train_length: int = 1
    acquisition: Literal["2D", "3D"] = "2D"
    sequence_name: str = ""
    #: Chemical fat suppression (fat saturation or SPAIR): fat keeps a few per cent of its signal.
    fat_suppressed: bool = False

    @property
    def scanning_sequence(self) -> str:
        """DICOM ScanningSequence (0018,0020)."""
        return {"SE": "SE", "FSE": "SE", "GRE": "GR", "STIR": "IR\\SE",
                "IR": "SE\\IR"}[self.kind]

    @property
    def sequence_variant(self) -> str:
        """DICOM SequenceVariant (0018,0021)."""
        return {"SE": "SP", "FSE": "SK\\SP", "GRE": "SP\\SS", "STIR": "SK\\SP",
                "IR": "SK\\SP\\MP"}[self.kind]

    @property
    def scan_options(self) -> str:
        """DICOM ScanOptions (0018,0022): FS for fat saturation (the inversion of STIR and IR
        is in ScanningSequence)."""
        return "FS" if self.fat_suppressed else ""


@dataclass(frozen=True)
class Grid:
    """In-plane acquisition geometry: matrix (rows, columns) and pixel spacing (row, column)
    in mm, slice thickness and gap in mm."""

    rows: int
    columns: int
    row_spacing_mm: float
    column_spacing_mm: float
    slice_thickness_mm: float
    slice_gap_mm: float = 0.0

    @property
    def slice_spacing_mm(self) -> float:
        return self.slice_thickness_mm + self.slice_gap_mm


@dataclass(frozen=True)
class Site:
    """A simulated site: scanner, protocol, geometry, intensity and header conventions."""

    key: str
    title: str
    manufacturer: str
    model: str
    field_t: float
    institution_name: str
    station_name: str
    t1w: PulseSequence
    t2w: PulseSequence
    ce: PulseSequence
    grid: Grid
    #: T2w acquired on its own grid (the engine must resample it onto the T1w grid).
    t2w_grid: Grid | None = None
    #: Multiplies the physical signal (PD units) into scanner units.
    intensity_scale: float = 1000.0
    #: Rician noise sigma as a fraction of the mean foreground signal.
    noise: float = 0.03
    #: Peak-to-peak amplitude of the smooth receive bias field (fraction).
    bias: float = 0.15
    #: (RescaleSlope, RescaleIntercept) written by vendors that use them; None: not written.
    rescale: tuple[float, float] | None = None
    pixel_representation: Literal[0, 1] = 0
    bits_stored: int = 16
    slice_order: Literal["ascending", "descending"] = "ascending"
    #: Rotation of the axial acquisition plane about the left-right axis (oblique axial), deg.
    tilt_deg: float = 0.0
    external: bool = False
    notes: str = field(default="", compare=False)

    def sequence(self, role: Role) -> PulseSequence:
        return {"t1w": self.t1w, "t2w": self.t2w, "ce": self.ce}[role]

    def grid_for(self, role: Role) -> Grid:
        return self.t2w_grid if role == "t2w" and self.t2w_grid is not None else self.grid


_STIR_H1 = PulseSequence("STIR", "t2_tirm_tra", (7640, 7640), (97, 97), ti_ms=165,
                    echo_train_length=17, sequence_name="*tir2d1_17")

SITES: dict[str, Site] = {
    inst.key: inst
    for inst in (
        Site(
            key="inst1",
            title="Hospital 1, Siemens 1.5 T (seed 000 Table 1)",
            manufacturer="SIEMENS", model="Avanto", field_t=1.5,
            institution_name="Simulated Hospital 1", station_name="SIMAVANTO1",
            t1w=PulseSequence("SE", "t1_tse_tra", (562, 739), (13, 17), echo_train_length=3,
                         sequence_name="*tse2d1_3"),
            t2w=_STIR_H1,
            ce=PulseSequence("SE", "t1_tse_tra_post", (562, 739), (13, 17), echo_train_length=3,
                        sequence_name="*tse2d1_3"),
            grid=Grid(256, 256, 0.9, 0.9, 4.0, 0.4),
            t2w_grid=Grid(320, 320, 0.72, 0.72, 4.0, 0.4),
            intensity_scale=1400.0, noise=0.035, bias=0.12, bits_stored=12,
        ),
        Site(
            key="inst2",
            title="Hospital 2, Philips 3 T (seed 000 Table 1)",
            manufacturer="Philips Medical Systems", model="Achieva", field_t=3.0,
            institution_name="Simulated Hospital 2", station_name="SIMACHIEVA2",
            t1w=PulseSequence("GRE", "T1W_FFE", (4.8, 9.4), (2.4, 8.0), flip_deg=15,
                         acquisition="3D", sequence_name="T1FFE"),
            t2w=PulseSequence("FSE", "T2W_TSE", (3500, 4900), (50, 80), echo_train_length=15,
                         sequence_name="TSE"),
            ce=PulseSequence("GRE", "T1W_FFE+C", (4.8, 9.4), (2.4, 8.0), flip_deg=15,
                        acquisition="3D", sequence_name="T1FFE"),
            grid=Grid(288, 288, 0.8, 0.8, 3.0, 0.0),
            intensity_scale=2800.0, noise=0.02, bias=0.25, rescale=(2.4, 0.0),
            slice_order="descending",
        ),
        Site(
            key="inst3",
            title="Hospital 3, Siemens 3 T (seed 000 Table 1)",
            manufacturer="SIEMENS", model="Skyra", field_t=3.0,
            institution_name="Simulated Hospital 3", station_name="SIMSKYRA3",
            t1w=PulseSequence("SE", "t1_tse_tra", (620, 620), (9.8, 9.8), echo_train_length=3,
                         sequence_name="*tse2d1_3"),
            t2w=PulseSequence("FSE", "t2_tse_tra", (2500, 2500), (74, 74), echo_train_length=13,
                         sequence_name="*tse2d1_13"),
            ce=PulseSequence("GRE", "t1_vibe_tra_post", (3.42, 3.42), (1.11, 1.11), flip_deg=9,
                        acquisition="3D", sequence_name="*fl3d1"),
            grid=Grid(320, 260, 0.72, 0.72, 3.5, 0.35),
            intensity_scale=2600.0, noise=0.02, bias=0.25,
        ),
        Site(
            key="inst4",
            title="Hospital 4, GE 3 T (seed 000 Table 1, external)",
            manufacturer="GE MEDICAL SYSTEMS", model="Discovery MR750", field_t=3.0,
            institution_name="Simulated Hospital 4", station_name="SIMMR750",
            t1w=PulseSequence("GRE", "AX T1 FSPGR", (4.3, 8.0), (3.0, 7.0), flip_deg=12,
                         acquisition="3D", sequence_name="efgre3d"),
            t2w=PulseSequence("FSE", "AX T2 FRFSE", (4200, 4899), (60, 80), echo_train_length=16,
                         sequence_name="frfse"),
            ce=PulseSequence("GRE", "AX T1 FSPGR +C", (4.3, 8.0), (3.0, 7.0), flip_deg=12,
                        acquisition="3D", sequence_name="efgre3d"),
            grid=Grid(256, 256, 0.86, 0.86, 5.0, 0.0),
            intensity_scale=1500.0, noise=0.025, bias=0.22, pixel_representation=1,
            slice_order="descending", external=True,
        ),
        Site(
            key="inst5",
            title="External site 5, Canon 1.5 T",
            manufacturer="CANON_MEC", model="Vantage Orian", field_t=1.5,
            institution_name="Simulated Hospital 5", station_name="SIMORIAN5",
            t1w=PulseSequence("SE", "T1 SE AX", (480, 520), (10, 12), sequence_name="SE"),
            t2w=PulseSequence("FSE", "T2 FSE AX", (3800, 4200), (85, 95), echo_train_length=12,
                         sequence_name="FSE"),
            ce=PulseSequence("SE", "T1 SE AX +C", (480, 520), (10, 12), sequence_name="SE"),
            grid=Grid(256, 224, 0.9375, 0.9375, 5.0, 0.5),
            intensity_scale=340.0, noise=0.04, bias=0.1, external=True,
        ),
        Site(
            key="inst6",
            title="External site 6, United Imaging 3 T, oblique axial",
            manufacturer="UIH", model="uMR 790", field_t=3.0,
            institution_name="Simulated Hospital 6", station_name="SIMUMR6",
            t1w=PulseSequence("FSE", "t1_fse_tra", (650, 750), (9, 11), echo_train_length=3,
                         sequence_name="fse"),
            t2w=PulseSequence("FSE", "t2_fse_tra", (4800, 5200), (80, 90), echo_train_length=16,
                         sequence_name="fse"),
            ce=PulseSequence("FSE", "t1_fse_tra_post", (650, 750), (9, 11), echo_train_length=3,
                        sequence_name="fse"),
            grid=Grid(320, 320, 0.72, 0.72, 4.0, 0.0),
            intensity_scale=1500.0, noise=0.02, bias=0.2, tilt_deg=8.0, external=True,
        ),
        Site(
            key="inst7",
            title="External site 7, Philips 1.5 T",
            manufacturer="Philips Healthcare", model="Ingenia", field_t=1.5,
            institution_name="Simulated Hospital 7", station_name="SIMINGENIA7",
            t1w=PulseSequence("SE", "T1W_SE", (520, 580), (9, 11), sequence_name="SE"),
            t2w=PulseSequence("STIR", "T2W_STIR", (5000, 5000), (70, 70), ti_ms=165,
                         echo_train_length=14, sequence_name="TSE"),
            ce=PulseSequence("SE", "T1W_SE+C", (520, 580), (9, 11), sequence_name="SE"),
            grid=Grid(288, 288, 0.8, 0.8, 4.0, 0.4),
            intensity_scale=700.0, noise=0.035, bias=0.12, rescale=(1.6, 0.0),
            slice_order="descending", external=True,
        ),
    )
}


def site(key: str) -> Site:
    """The site called ``key``; raises ``KeyError`` naming the known ones."""
    try:
        return SITES[key]
    except KeyError:
        raise KeyError(
            f"unknown institution {key!r} (known: {', '.join(SITES)})"
        ) from None
