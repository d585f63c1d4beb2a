"""Finding external tools, and the rule for when one is missing.

Outside CI a test that needs a missing tool skips with the reason (and how to install it);
with ``CI=true`` it fails, so a CI run can never pass by skipping the real DICOM checks.
:func:`unavailable` applies the same rule to anything else a test cannot do here.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

#: Debian package that provides each tool (for the skip/fail message).
PACKAGES = {
    "storescp": "dcmtk",
    "storescu": "dcmtk",
    "dcmcjpeg": "dcmtk",
    "dcmcjpls": "dcmtk",
    "dcmcrle": "dcmtk",
    "dcmconv": "dcmtk",
    "dciodvfy": "dicom3tools",
    "Orthanc": "orthanc",
    "openssl": "openssl",
    "redis-server": "redis-server",
}

#: Where Debian installs them; searched after PATH.
_SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin")


def in_ci() -> bool:
    """Whether this run is CI (``CI`` set to true/1/yes), where missing tools are failures."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _candidates(name: str) -> list[Path]:
    dirs = os.environ.get("PATH", "").split(os.pathsep) + list(_SYSTEM_DIRS)
    seen, out = set(), []
    for d in dirs:
        path = Path(d or ".") / name
        if path not in seen and path.is_file() and os.access(path, os.X_OK):
            seen.add(path)
            out.append(path)
    return out


@functools.cache
def dcmtk_tool(name: str) -> Path | None:
    """The dcmtk executable ``name``, or None.

    pynetdicom installs Python apps called ``storescp``, ``storescu``, ``echoscu``... that
    shadow dcmtk's on PATH, so each candidate must say it is dcmtk in its ``--version``.
    """
    for path in _candidates(name):
        try:
            out = subprocess.run(
                [str(path), "--version"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return path
    return None


@functools.cache
def system_tool(name: str) -> Path | None:
    """An executable from PATH or Debian's directories, or None."""
    found = shutil.which(name)
    if found:
        return Path(found)
    candidates = _candidates(name)
    return candidates[0] if candidates else None


def unavailable(reason: str) -> NoReturn:
    """Skip the test with ``reason``; with CI=true fail it instead (CI skips nothing)."""
    if in_ci():
        pytest.fail(f"{reason}; CI must run every test, not skip it", pytrace=False)
    pytest.skip(reason)


def require(name: str) -> Path:
    """The tool's path; skips the test (fails it in CI) when it is missing."""
    path = dcmtk_tool(name) if PACKAGES.get(name) == "dcmtk" else system_tool(name)
    if path is not None:
        return path
    package = PACKAGES.get(name, name)
    unavailable(f"{name} not found (install the Debian package '{package}')")
