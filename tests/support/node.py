"""A vcemri node for tests: a configuration file with fast timings, the node in this process
(:func:`start_node`) or as ``vcemri serve`` in its own process (:class:`NodeProcess`), and
helpers to wait for jobs."""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

import config

from .processes import ManagedProcess, free_port, port_open


def write_config(path: Path, root: Path, checkpoint: Path, *, port: int | None = None,
                 destinations: dict[str, dict[str, Any]] | None = None,
                 **sections: dict[str, Any]) -> Path:
    """A node configuration with test timings (1 s series idle time, 0.3 s first retry).

    ``sections`` replace or extend top-level sections, e.g. ``dicom={...}`` is merged into
    the ``dicom`` section."""
    document: dict[str, Any] = {
        "dicom": {"ae_title": "VCEMRI", "port": port or free_port(),
                  "timeouts": {"acse_s": 10, "dimse_s": 30, "network_s": 30}},
        "storage": {"root": str(root), "min_free_mib": 0},
        "assembly": {"series_idle_s": 1.0, "study_timeout_s": 60.0},
        "jobs": {"workers": 1, "max_attempts": 3, "retry_initial_s": 0.3, "retry_max_s": 1.0,
                 "send_max_age_s": 120.0},
        "models": {"default": {"checkpoint": str(checkpoint), "device": "cpu",
                               "batch_size": 8}},
        "destinations": destinations or {"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                                 "port": free_port()}},
        "routes": [{"name": "default", "model": "default",
                    "destinations": list((destinations or {"tps": {}}).keys())}],
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(document.get(name), dict):
            document[name] = {**document[name], **values}
        else:
            document[name] = values
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def start_node(config_file: Path) -> Any:
    """A started in-process :class:`dicom_node.Node` (stop it with ``node.stop()``)."""
    import dicom_node

    return dicom_node.Node(config.load_settings(config_file)).start()


class NodeProcess:
    """``vcemri --config FILE serve`` in its own process group (killable with SIGKILL)."""

    def __init__(self, config_file: Path, log_path: Path, timeout: float = 60.0) -> None:
        settings = config.load_settings(config_file)
        self.port = settings.dicom.port
        self.root = Path(settings.storage.root)
        self.process = ManagedProcess(
            [sys.executable, "-m", "vcemri", "--config", str(config_file), "serve"], log_path)
        self.process.wait_until(lambda: port_open(self.port), timeout, "vcemri serve")

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as a power cut would leave it."""
        self.process.stop(graceful=False)

    def stop(self) -> int | None:
        return self.process.stop(grace=30.0)


def query(root: Path, sql: str, *args: Any) -> list[sqlite3.Row]:
    """Read the node's database (as the ``vcemri jobs`` command does)."""
    connection = sqlite3.connect(Path(root) / "node.sqlite", timeout=30)
    connection.row_factory = sqlite3.Row
    try:
        return connection.execute(sql, args).fetchall()
    finally:
        connection.close()


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """Poll until ``condition()`` is truthy; return its value or fail with ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except sqlite3.OperationalError:  # the database is not created yet
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def jobs(root: Path) -> list[sqlite3.Row]:
    return query(root, "SELECT * FROM jobs ORDER BY id")


def finished_jobs(root: Path) -> list[sqlite3.Row]:
    return [j for j in jobs(root) if j["state"] in ("done", "failed", "rejected", "cancelled")]
