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

#: pynetdicom's ERROR lines about an association it could not make as a requestor: the
#: sender reports each failure itself, once, with its cause (dicom_node/sender.py), so these
#: are shown only at DEBUG.
_REPORTED_BY_US = ("Association request failed", "TCP Initialisation Error", "[SSL:",
                   "Association Rejected", "Result: ", "Reason: ", "Association Aborted")


class _Reported(logging.Filter):
    """Demotes pynetdicom's duplicates of what vcemri reports itself to DEBUG."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(_REPORTED_BY_US):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.debug
        return True


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
    debug = level.upper() == "DEBUG"
    quiet = logging.DEBUG if debug else logging.WARNING
    for name in _QUIET:
        logging.getLogger(name).setLevel(quiet)
    for module in ("pynetdicom.transport", "pynetdicom.acse"):
        target = logging.getLogger(module)
        for old in [f for f in target.filters if isinstance(f, _Reported)]:
            target.removeFilter(old)
        target.addFilter(_Reported(debug))
