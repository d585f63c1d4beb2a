"""Console logging for every vcemri command: human-readable lines or JSON lines.

Modules log with ``logging.getLogger(__name__)`` and pass identifiers as structured fields,
``log.info("series complete", extra={"series_uid": uid, "count": 120})``; only the fields in
:data:`config.phi.ALLOWED_FIELDS` are rendered, and :class:`config.phi.PHIFilter` redacts
person names and datasets passed by mistake.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal, TextIO

from .phi import ALLOWED_FIELDS, PHIFilter

LogFormat = Literal["human", "json"]

#: Chatty third-party loggers kept at WARNING unless the level is DEBUG.
_QUIET = ("pynetdicom", "PIL", "matplotlib", "highdicom")

_HANDLER_NAME = "vcemri-console"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k in ALLOWED_FIELDS}


class HumanFormatter(logging.Formatter):
    """``2026-11-21 10:00:00 INFO    dicom_node.scp: series complete [series_uid=1.2 count=3]``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        if fields:
            text += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(
    format: LogFormat = "human", level: str = "INFO", stream: TextIO | None = None
) -> None:
    """Install the console handler on the root logger (idempotent: replaces our own handler)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if format == "json" else HumanFormatter())
    handler.addFilter(PHIFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    for name in _QUIET:
        logging.getLogger(name).setLevel(quiet)
