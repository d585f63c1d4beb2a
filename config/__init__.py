"""Typed configuration, errors, logging, PHI policy and audit log: the foundation every other
vcemri package imports. This package imports none of them.
"""

from .audit import AuditLog, Verification
from .audit import read as read_audit
from .audit import verify as verify_audit
from .errors import ConfigError, InputError, ModelError, PeerError, StorageError, VcemriError
from .lazy import lazy_attributes
from .loading import (
    CONFIG_ENV,
    config_path,
    default_config_path,
    effective_yaml,
    load_settings,
)
from .logs import setup_logging
from .phi import ALLOWED_FIELDS, PHI_KEYWORDS, PHIFilter, is_uid, loggable_identifiers
from .reference import reference_markdown
from .settings import (
    BUILTIN_MODEL_NAMES,
    Destination,
    DicomNode,
    ModelChoice,
    PlanningSettings,
    Route,
    RouteMatch,
    SeriesRule,
    Settings,
)

__all__ = [
    "ALLOWED_FIELDS",
    "BUILTIN_MODEL_NAMES",
    "CONFIG_ENV",
    "PHI_KEYWORDS",
    "AuditLog",
    "ConfigError",
    "Destination",
    "DicomNode",
    "InputError",
    "ModelChoice",
    "ModelError",
    "PHIFilter",
    "PeerError",
    "PlanningSettings",
    "Route",
    "RouteMatch",
    "SeriesRule",
    "Settings",
    "StorageError",
    "VcemriError",
    "Verification",
    "config_path",
    "default_config_path",
    "effective_yaml",
    "is_uid",
    "lazy_attributes",
    "load_settings",
    "loggable_identifiers",
    "read_audit",
    "reference_markdown",
    "setup_logging",
    "verify_audit",
]
