"""Reading a simulated cohort back in tests: its manifest rows and one series' datasets."""

from __future__ import annotations

import csv
from pathlib import Path

import pydicom


def manifest_rows(out: Path) -> list[dict[str, str]]:
    """The rows of ``out/manifest.csv`` (patient, institution, role, path)."""
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def role_series(out: Path, institution: str, role: str) -> list[pydicom.Dataset]:
    """The datasets of the one series of ``role`` at ``institution`` (one patient per
    institution), sorted by file name."""
    [row] = [r for r in manifest_rows(out)
             if r["institution"] == institution and r["role"] == role]
    return [pydicom.dcmread(p) for p in sorted((out / row["path"]).glob("*.dcm"))]
