"""A throw-away Orthanc server (Debian's ``Orthanc``) on free loopback ports, with its REST API.

Used as the PACS stand-in: objects we write are stored into it over DICOM and queried back
over REST to check that a real archive accepts them and sees the right hierarchy.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from .processes import ManagedProcess, ServerStartError, free_port, port_open
from .tools import require


class Orthanc:
    """A running Orthanc whose storage lives under ``workdir``; stop it with :meth:`stop`."""

    def __init__(self, workdir: Path, *, ae_title: str = "ORTHANC",
                 start_timeout: float = 30.0) -> None:
        binary = require("Orthanc")
        self.ae_title = ae_title
        self.host = "127.0.0.1"
        workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.dicom_port, self.http_port = free_port(), free_port()
            if self.dicom_port == self.http_port:
                continue
            settings = {
                "Name": "vcemri-test",
                "StorageDirectory": str(workdir / "storage"),
                "IndexDirectory": str(workdir / "storage"),
                "DicomAet": ae_title,
                "DicomPort": self.dicom_port,
                "HttpPort": self.http_port,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "DicomCheckCalledAet": True,
                "DicomAlwaysAllowStore": True,
                "DicomAlwaysAllowEcho": True,
                "Plugins": [],
                "StableAge": 1,
            }
            config_file = workdir / f"orthanc-{self.http_port}.json"
            config_file.write_text(json.dumps(settings, indent=2))
            self.process = ManagedProcess(
                [binary, str(config_file)], workdir / f"orthanc-{self.http_port}.log"
            )
            try:
                self.process.wait_until(self._ready, start_timeout, "Orthanc")
                return
            except ServerStartError as exc:
                if "bind" not in str(exc).lower() and "address" not in str(exc).lower():
                    raise
        raise ServerStartError("Orthanc could not bind free ports in 3 attempts")

    def _ready(self) -> bool:
        if not (port_open(self.http_port) and port_open(self.dicom_port)):
            return False
        try:
            return self.get("/system")["DicomPort"] == self.dicom_port
        except (OSError, ValueError, KeyError):
            return False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json") -> Any:
        request = urllib.request.Request(
            self.url + path, data=body, method=method, headers={"Content-Type": content_type}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        """GET a REST resource, e.g. ``/studies`` or ``/instances/<id>/simplified-tags``."""
        return self._request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        """POST JSON to a REST resource, e.g. ``/tools/find``."""
        return self._request("POST", path, json.dumps(payload).encode())

    def upload(self, file: Path) -> dict[str, Any]:
        """Store a DICOM file through REST (not DICOM); returns Orthanc's answer."""
        return self._request("POST", "/instances", file.read_bytes(), "application/dicom")

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.get("/instances"))

    def tags(self, instance_id: str) -> dict[str, Any]:
        """An instance's tags by keyword (Orthanc's simplified form)."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def log(self) -> str:
        """Everything Orthanc has logged so far."""
        return self.process.log_path.read_text(errors="replace")

    def stop(self, *, graceful: bool = False) -> None:
        """Kill the server. Its storage is thrown away with the test, so by default there is
        no graceful shutdown (Orthanc's takes about 3.5 s: it polls its threads)."""
        self.process.stop(graceful=graceful)

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
