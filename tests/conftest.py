"""Shared fixtures: real DICOM peers and validators for every test that needs them.

- ``tps``: a running dcmtk storescp (AE ``TPS``) on a free loopback port that keeps a file
  per C-STORE (``tps.assert_each_once(uids)`` counts deliveries);
- ``orthanc``: a running Orthanc (AE ``ORTHANC``) with its REST API;
- ``dciodvfy``: verify a file with dicom3tools, returning errors and warnings;
- ``send``: dcmtk storescu with TCP_NODELAY;
- ``mr_file``: a small valid MR Image Storage file (pydicom's MR_small).

- ``no_vcemri_environment``: no ``VCEMRI_*`` variables leak into configuration tests.

A missing tool skips the test with the reason, except with CI=true where it fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from support.dciodvfy import DciodvfyReport
from support.dciodvfy import dciodvfy as run_dciodvfy
from support.dcmtk import StoreResult, StoreSCP, storescu
from support.orthanc import Orthanc


@pytest.fixture
def no_vcemri_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every ``VCEMRI_*`` variable, so configuration tests see only their own."""
    for name in list(os.environ):
        if name.upper().startswith("VCEMRI_"):
            monkeypatch.delenv(name)


@pytest.fixture
def tps(tmp_path: Path) -> Iterator[StoreSCP]:
    """A treatment planning system stand-in: dcmtk storescp, AE title TPS."""
    with StoreSCP(tmp_path / "tps") as server:
        yield server


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A PACS stand-in: a fresh Orthanc, AE title ORTHANC."""
    with Orthanc(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture
def dciodvfy() -> Callable[[Path], DciodvfyReport]:
    """``dciodvfy(path)`` -> report with ``errors``, ``warnings``, ``iod`` and ``ok``."""
    return run_dciodvfy


@pytest.fixture
def send() -> Callable[..., StoreResult]:
    """``send(files, port, called_ae=...)`` with dcmtk storescu."""
    return storescu


@pytest.fixture
def mr_file() -> Path:
    """pydicom's MR_small.dcm: MR Image Storage, 64x64, dciodvfy reports no errors."""
    path = get_testdata_file("MR_small.dcm")
    assert path is not None
    return Path(path)
