"""Validated value types for the configuration: TCP ports, AE titles, host names, regular
expressions, existing files, devices.

Each validator raises a :class:`PydanticCustomError` whose message already names the bad value
and what is allowed, so :mod:`config.loading` can print it as is after the key path.
"""

from __future__ import annotations

import contextvars
import ipaddress
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

#: Directory against which relative paths in the configuration are resolved: the directory of
#: the YAML file being loaded, or the working directory when no file is involved.
base_directory: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "vcemri_config_base_directory", default=None
)

#: Error types whose message is complete (it names the value and what is allowed).
SELF_DESCRIBING_ERRORS = frozenset(
    {"tcp_port", "ae_title", "host", "regex", "file_missing", "device", "checkpoint", "range",
     "references", "tls", "rule"}
)


def _tcp_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise PydanticCustomError(
            "tcp_port", "{value} is not a valid TCP port (1-65535)", {"value": value}
        )
    return value


def _ae_title(value: str) -> str:
    # PS3.5 table 6.2-1: AE is at most 16 characters of the default repertoire, no backslash,
    # no control characters; leading and trailing spaces are not significant.
    stripped = value.strip(" ")
    if (
        not 1 <= len(stripped) <= 16
        or "\\" in stripped
        or any(not (32 <= ord(c) < 127) for c in stripped)
    ):
        raise PydanticCustomError(
            "ae_title",
            "{value} is not a valid AE title (1-16 printable ASCII characters, no backslash)",
            {"value": repr(value)},
        )
    return stripped


_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def _host(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOSTNAME.match(value):
        raise PydanticCustomError(
            "host", "{value} is not an IP address or host name", {"value": repr(value)}
        )
    return value


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise PydanticCustomError(
            "regex",
            "{value} is not a valid regular expression ({problem})",
            {"value": repr(value), "problem": str(exc)},
        ) from None
    return value


def resolve_path(value: str | Path) -> Path:
    """Expand ``~`` and make ``value`` absolute against the configuration's base directory."""
    if not isinstance(value, (str, Path)):
        return value  # type: ignore[return-value]  # let pydantic's Path check report it
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (base_directory.get() or Path.cwd()) / path
    return Path(str(path.resolve(strict=False)))


def _existing_file(value: Path) -> Path:
    if not value.is_file():
        what = "is a directory, not a file" if value.is_dir() else "does not exist"
        raise PydanticCustomError(
            "file_missing", "file '{path}' {what}", {"path": str(value), "what": what}
        )
    return value


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _device(value: str) -> str:
    if not _DEVICE.match(value):
        raise PydanticCustomError(
            "device", "{value} is not a device (auto, cpu, cuda or cuda:N)", {"value": repr(value)}
        )
    return value


TcpPort = Annotated[int, AfterValidator(_tcp_port)]
AETitle = Annotated[str, AfterValidator(_ae_title)]
Host = Annotated[str, AfterValidator(_host)]
Regex = Annotated[str, AfterValidator(_regex)]
AnyPath = Annotated[Path, BeforeValidator(resolve_path)]
ExistingFile = Annotated[Path, BeforeValidator(resolve_path), AfterValidator(_existing_file)]
Device = Annotated[str, AfterValidator(_device)]
Seconds = Annotated[float, Field(gt=0)]
