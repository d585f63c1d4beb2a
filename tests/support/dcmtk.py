"""dcmtk's storescp as a TPS stand-in, and storescu as a scanner stand-in."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .processes import ManagedProcess, ServerStartError, free_port, port_open
from .tools import require

#: Without it dcmtk leaves Nagle's algorithm on and loopback transfers stall ~40 ms per instance.
NODELAY_ENV = {"TCP_NODELAY": "1"}


def _env() -> dict[str, str]:
    return {**os.environ, **NODELAY_ENV}


class StoreSCP:
    """A running dcmtk ``storescp`` on a free loopback port, storing into ``output_dir``.

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
                 "--accept-all", "--promiscuous", *extra_args, str(self.port)],
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
             calling_ae: str = "STORESCU", extra_args: Sequence[str] = (),
             timeout: float = 120.0) -> StoreResult:
    """Send ``files`` (or directories of files) with dcmtk ``storescu`` in one association,
    with TCP_NODELAY set. storescu proposes each file's own transfer syntax, so compressed
    files travel compressed.
    """
    binary = require("storescu")
    argv = [str(binary), "--aetitle", calling_ae, "--call", called_ae, "--scan-directories",
            *extra_args, host, str(port), *[str(f) for f in files]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env(), check=False)
    return StoreResult(done.returncode, done.stdout + done.stderr)
