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


#: Errors that are gaps in the installed dciodvfy's data dictionary, not in our files, with why.
#: Debian's dicom3tools 1.00~20220618 predates SyntheticData (0008,001C), a standard General
#: Image attribute, and calls it "not a recognized standard attribute". Only that exact error
#: for that exact tag is set aside; every other error counts.
KNOWN_DICTIONARY_GAPS = {
    "(0x0008,0x001c)": "SyntheticData (0008,001C) is standard; this dciodvfy's dictionary "
                       "predates it",
}
_GAP_ERROR = "Attribute with an even group number is not a recognized standard attribute"


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
    #: errors set aside as dictionary gaps of the tool (see KNOWN_DICTIONARY_GAPS)
    set_aside: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No errors (warnings are allowed)."""
        return not self.errors


def parse(path: Path, output: str, returncode: int = 0) -> DciodvfyReport:
    """Turn dciodvfy's output into a report; raises :class:`DciodvfyAbort` on 'Abort' lines."""
    iod, errors, warnings, set_aside = None, [], [], []
    for raw in output.splitlines():
        line = raw.strip()
        match = _FINDING.search(line)
        if match:
            kind, text = match.groups()
            if kind == "Abort":
                raise DciodvfyAbort(f"dciodvfy could not verify {path}: {text}")
            prefix = line[: match.start()].strip()
            if kind == "Error" and text.startswith(_GAP_ERROR) and any(
                    tag in text for tag in KNOWN_DICTIONARY_GAPS):
                set_aside.append(text)
                continue
            (errors if kind == "Error" else warnings).append(f"{prefix} {text}".strip())
        elif iod is None and _IOD.match(line):
            iod = line
    return DciodvfyReport(path, iod, errors, warnings, returncode, set_aside)


def dciodvfy(path: Path, timeout: float = 60.0) -> DciodvfyReport:
    """Run dciodvfy on ``path`` (skips, or fails in CI, when dicom3tools is missing)."""
    binary = require("dciodvfy")
    done = subprocess.run(
        [str(binary), str(path)], capture_output=True, text=True, timeout=timeout, check=False
    )
    return parse(path, done.stdout + done.stderr, done.returncode)
