"""dicom3tools' ``dciodvfy``: verify a file against its IOD and parse the verdict."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .tools import require

# dciodvfy writes "Error - ...", "Warning - ..." and "Abort - ..." lines to stderr; element-level
# lines carry a tag prefix ("(0x0008,0x0060) CS ... - Error - ..."). A bare word on its own
# line names the IOD it chose (e.g. "MRImage").
_FINDING = re.compile(r"(?:^|\s-\s)(Error|Warning|Abort) - (.*)$")
_IOD = re.compile(r"^[A-Z][A-Za-z0-9]+$")


class DciodvfyAbort(RuntimeError):
    """dciodvfy could not verify the file at all (unreadable, missing)."""


@dataclass(frozen=True)
class DciodvfyReport:
    """Parsed dciodvfy output for one file."""

    path: Path
    iod: str | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    returncode: int = 0

    @property
    def ok(self) -> bool:
        """No errors (warnings are allowed)."""
        return not self.errors


def parse(path: Path, output: str, returncode: int = 0) -> DciodvfyReport:
    """Turn dciodvfy's output into a report; raises :class:`DciodvfyAbort` on 'Abort' lines."""
    iod, errors, warnings = None, [], []
    for raw in output.splitlines():
        line = raw.strip()
        match = _FINDING.search(line)
        if match:
            kind, text = match.groups()
            if kind == "Abort":
                raise DciodvfyAbort(f"dciodvfy could not verify {path}: {text}")
            prefix = line[: match.start()].strip()
            (errors if kind == "Error" else warnings).append(f"{prefix} {text}".strip())
        elif iod is None and _IOD.match(line):
            iod = line
    return DciodvfyReport(path, iod, errors, warnings, returncode)


def dciodvfy(path: Path, timeout: float = 60.0) -> DciodvfyReport:
    """Run dciodvfy on ``path`` (skips, or fails in CI, when dicom3tools is missing)."""
    binary = require("dciodvfy")
    done = subprocess.run(
        [str(binary), str(path)], capture_output=True, text=True, timeout=timeout, check=False
    )
    return parse(path, done.stdout + done.stderr, done.returncode)
