"""dcmtk's storescp as a TPS stand-in, and storescu as a scanner stand-in."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from .processes import ManagedProcess, ServerStartError, free_port, port_open
from .tools import require

#: Without it dcmtk leaves Nagle's algorithm on and loopback transfers stall ~40 ms per instance.
NODELAY_ENV = {"TCP_NODELAY": "1"}

#: storescu's option that proposes a transfer syntax first (with the uncompressed ones after
#: it), so a file in that syntax travels as it is instead of being converted.
PROPOSE = {
    "1.2.840.10008.1.2": "--propose-implicit",
    "1.2.840.10008.1.2.1": "--propose-little",
    "1.2.840.10008.1.2.2": "--propose-big",
    "1.2.840.10008.1.2.1.99": "--propose-deflated",
    "1.2.840.10008.1.2.4.50": "--propose-jpeg8",       # JPEG baseline
    "1.2.840.10008.1.2.4.51": "--propose-jpeg12",      # JPEG extended
    "1.2.840.10008.1.2.4.70": "--propose-lossless",    # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": "--propose-jls-lossless",
    "1.2.840.10008.1.2.4.81": "--propose-jls-lossy",   # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "--propose-j2k-lossless",
    "1.2.840.10008.1.2.4.91": "--propose-j2k-lossy",
    "1.2.840.10008.1.2.5": "--propose-rle",
}


def _env() -> dict[str, str]:
    return {**os.environ, **NODELAY_ENV}


def _repeated(counts: Counter[str]) -> dict[str, int]:
    return {uid: n for uid, n in sorted(counts.items()) if n > 1}


@dataclass(frozen=True)
class Receipt:
    """One C-STORE storescp accepted: the instance's SOP Instance UID and the file it wrote."""

    sop_instance_uid: str
    path: Path


class StoreSCP:
    """A running dcmtk ``storescp`` on a free loopback port, storing into ``output_dir``.

    Every C-STORE it accepts leaves its own file (``--unique-filenames``): with storescp's
    default names (the SOP Instance UID) a second delivery of an instance would overwrite the
    first and a duplicate could not be seen. :meth:`receipts` and :meth:`assert_each_once`
    count deliveries.

    ``extra_args`` adds storescp options, e.g. ``["--refuse"]`` for a TPS that refuses every
    association or ``["--abort-during"]`` for one that drops the connection mid-transfer.
    """

    def __init__(self, workdir: Path, *, ae_title: str = "TPS",
                 extra_args: Sequence[str] = (), start_timeout: float = 15.0,
                 port: int | None = None) -> None:
        self.ae_title = ae_title
        self.host = "127.0.0.1"
        self.output_dir = workdir / "received"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        binary = require("storescp")
        for _ in range(3):  # another process may take the free port before storescp binds it
            self.port = port or free_port()
            self.process = ManagedProcess(
                [binary, "--aetitle", ae_title, "--output-directory", self.output_dir,
                 "--accept-all", "--promiscuous", "--unique-filenames", *extra_args,
                 str(self.port)],
                workdir / f"storescp-{self.port}.log",
                env=_env(),
            )
            try:
                self.process.wait_until(lambda: port_open(self.port), start_timeout, "storescp")
                return
            except ServerStartError as exc:
                if port is not None or "bind" not in str(exc).lower():
                    raise
        raise ServerStartError("storescp could not bind a free port in 3 attempts")

    def received(self) -> list[Path]:
        """Files storescp has written, sorted by name."""
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())

    def receipts(self) -> list[Receipt]:
        """Every C-STORE storescp accepted, one per file: a duplicate delivery is two."""
        return [Receipt(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID),
                        path) for path in self.received()]

    def duplicates(self) -> dict[str, int]:
        """SOP Instance UIDs received more than once, with how many times."""
        return _repeated(Counter(r.sop_instance_uid for r in self.receipts()))

    def assert_each_once(self, expected: Iterable[str]) -> None:
        """Assert that every instance in ``expected`` arrived exactly once and nothing else
        did (counted per C-STORE, not as a set of UIDs)."""
        counts = Counter(r.sop_instance_uid for r in self.receipts())
        wanted = set(expected)
        problems = []
        duplicated = _repeated(counts)
        if duplicated:
            problems.append(f"{len(duplicated)} instance(s) received more than once: "
                            + ", ".join(f"{uid} x{n}" for uid, n in duplicated.items()))
        missing = sorted(wanted - set(counts))
        if missing:
            problems.append(f"{len(missing)} instance(s) never received: {', '.join(missing)}")
        unexpected = sorted(set(counts) - wanted)
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected instance(s): {', '.join(unexpected)}")
        assert not problems, f"{self.ae_title} (storescp): " + "; ".join(problems)

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> StoreSCP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class StoreResult:
    """What a storescu run did: its exit code and output."""

    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def storescu(files: Iterable[Path], port: int, *, called_ae: str, host: str = "127.0.0.1",
             calling_ae: str = "STORESCU", transfer_syntax: str | None = None,
             extra_args: Sequence[str] = (), timeout: float = 120.0) -> StoreResult:
    """Send ``files`` (or directories of files) with dcmtk ``storescu`` in one association,
    with TCP_NODELAY set.

    By default storescu proposes the uncompressed transfer syntaxes only: it converts big
    endian and deflated files to little endian and cannot send a compressed file at all
    ("DIMSE Failed to send message"). ``transfer_syntax`` (a UID in :data:`PROPOSE`) proposes
    that syntax first, so files in it travel as they are.
    """
    binary = require("storescu")
    propose = [] if transfer_syntax is None else [PROPOSE[transfer_syntax]]
    argv = [str(binary), "--aetitle", calling_ae, "--call", called_ae, "--scan-directories",
            *propose, *extra_args, host, str(port), *[str(f) for f in files]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env(), check=False)
    return StoreResult(done.returncode, done.stdout + done.stderr)
