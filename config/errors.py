"""The project's exception hierarchy.

Every failure a person can act on is raised as a :class:`VcemriError` subclass whose ``reason``
is a complete, user-facing sentence (what went wrong and, where known, what to do). The CLI prints
``reason`` on one line and exits with ``exit_code``; the node copies it into the job state and the
audit log. Anything that is *not* a ``VcemriError`` is a bug and is reported as such.

Reasons must follow the PHI policy (:mod:`config.phi`): UIDs, job ids, AE titles and file paths
chosen by the administrator are fine; patient names, IDs and birth dates never are.
"""

from __future__ import annotations

from collections.abc import Sequence


class VcemriError(Exception):
    """Base of all expected failures; carries a user-facing reason."""

    #: Process exit code the CLI uses for this kind of failure.
    exit_code: int = 1

    def __init__(self, reason: str, *, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        return self.reason if self.hint is None else f"{self.reason} ({self.hint})"


class ConfigError(VcemriError):
    """The configuration (file, environment or command line) is invalid.

    ``problems`` holds one line per problem, each naming the key path, the bad value and what
    is allowed, so an administrator can fix every problem in one pass.
    """

    exit_code = 2

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(f"{source}: {self.problems[0]}")
        else:
            header = f"{source}: {len(self.problems)} configuration problems"
            super().__init__(header + "".join(f"\n  {p}" for p in self.problems))


class InputError(VcemriError):
    """Received or given data cannot be used: unreadable file, wrong modality, missing series,
    inconsistent geometry, data the model is not fit for."""


class ModelError(VcemriError):
    """A model checkpoint is missing, corrupted or incompatible with this version."""


class StorageError(VcemriError):
    """Data could not be made durable: disk full, permission denied, I/O error."""


class PeerError(VcemriError):
    """A DICOM peer (TPS, PACS, router) refused, failed or could not be reached."""
