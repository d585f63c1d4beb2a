"""Load the configuration: YAML file + ``VCEMRI_*`` environment, validated, with every problem
reported as one line naming the key path, the bad value, what is allowed and where it came from.

Which file: the ``path`` argument, else ``$VCEMRI_CONFIG``, else the packaged
``config/default.yaml``. Relative paths inside a file are resolved against its directory.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_settings import EnvSettingsSource, SettingsError

from .errors import ConfigError
from .settings import ENV_DELIMITER, ENV_PREFIX, Settings
from .types import SELF_DESCRIBING_ERRORS, base_directory

#: Environment variable naming the configuration file.
CONFIG_ENV = "VCEMRI_CONFIG"

Loc = tuple[str | int, ...]


def default_config_path() -> Path:
    """The packaged default configuration (works with no edits)."""
    return Path(str(resources.files("config").joinpath("default.yaml")))


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The file that :func:`load_settings` reads for ``path`` (see the module docstring)."""
    if path is not None:
        return Path(path)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return default_config_path()


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: a repeated key is almost always a typo."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain name, not a {type(key).__name__}",
                key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping  # type: ignore[arg-type]
)


def _line_map(node: yaml.Node | None, loc: Loc = ()) -> dict[Loc, int]:
    """Map each key path in a composed YAML document to its 1-based line number."""
    lines: dict[Loc, int] = {}
    if node is None:
        return lines
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*loc, key_node.value)
            lines.update(_line_map(value_node, child))
            lines[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_map(item, (*loc, i)))
    return lines


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[Loc, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ["file does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot be read: {exc}"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
        lines = _line_map(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [f"{where}invalid YAML: {problem}"]) from None
    if data is None:
        return {}, lines
    if not isinstance(data, dict):
        raise ConfigError(
            str(path), [f"the top level must be a mapping of sections, not {type(data).__name__}"]
        )
    return data, lines


def format_loc(loc: Loc) -> str:
    """``('routes', 0, 'match')`` -> ``routes[0].match``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _env_name(loc: Loc) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(str(p).upper() for p in loc)


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model class that holds the key at ``loc`` (used to list the allowed keys)."""
    annotation: Any = Settings
    for part in loc[:-1]:
        annotation = _unwrap(annotation)
        if isinstance(part, str) and isinstance(annotation, type) and issubclass(
            annotation, BaseModel
        ):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(annotation) in (list, dict):
            annotation = typing.get_args(annotation)[-1]
        else:
            return None
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(error: Mapping[str, Any]) -> list[str]:
    loc: Loc = tuple(error["loc"])
    path = format_loc(loc)
    kind = error["type"]
    if kind == "references":
        return list(error["ctx"]["problems"])
    if kind == "missing":
        return [f"{path}: required setting is missing"]
    if kind == "extra_forbidden":
        model = _model_at(loc)
        allowed = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listing = f"({hint}allowed: {', '.join(allowed)})" if allowed else ""
        return [f"{path}: unknown key {listing}".rstrip()]
    if kind in SELF_DESCRIBING_ERRORS:
        return [f"{path}: {error['msg']}" if path else error["msg"]]
    return [f"{path}: {_short(error.get('input'))} is not allowed: {error['msg']}"]


def _where(loc: Loc, lines: Mapping[Loc, int], environ: Mapping[str, str]) -> str:
    upper_env = {k.upper() for k in environ}
    for end in range(len(loc), 0, -1):
        if _env_name(loc[:end]) in upper_env:
            return f" [from {_env_name(loc[:end])}]"
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return f" [line {lines[loc[:end]]}]" if end else ""
    return ""


def _unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """``VCEMRI_*`` variables that name no section: pydantic-settings would ignore them."""
    sections = {name.upper() for name in Settings.model_fields}
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV:
            continue
        section = upper[len(ENV_PREFIX):].split(ENV_DELIMITER)[0]
        if section not in sections:
            problems.append(
                f"{name}: environment variable names no setting "
                f"(sections: {', '.join(sorted(s.lower() for s in sections))})"
            )
    return problems


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read, merge and validate the configuration.

    Raises :class:`ConfigError` listing every problem found, each with its key path, the bad
    value, what is allowed, and its line in the file or the environment variable it came from.
    ``VCEMRI_<SECTION>__<KEY>`` variables in the process environment override the file.
    """
    environ = os.environ
    source = config_path(path)
    data, lines = _read_yaml(source)
    problems = _unknown_environment(environ)
    token = base_directory.set(source.resolve().parent)
    try:
        # The file alone first, so its problems point at its lines; then the environment,
        # merged key by key over the file's effective settings (defaults included).
        settings = Settings.model_validate(data)
        try:
            overrides = EnvSettingsSource(Settings)()
        except SettingsError as exc:
            # A VCEMRI_ variable for a list or mapping that is not valid JSON.
            names = ", ".join(sorted(k for k in environ if k.upper().startswith(ENV_PREFIX)))
            raise ConfigError("environment", [
                f"{exc}: lists and mappings in VCEMRI_ variables must be JSON "
                f"(set: {names})"]) from None
        if overrides:
            merged = _deep_merge(settings.model_dump(), overrides)
            settings = Settings.model_validate(merged)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            where = _where(tuple(error["loc"]), lines, environ)
            problems.extend(line + where for line in _describe(error))
        raise ConfigError(str(source), problems) from None
    finally:
        base_directory.reset(token)
    if problems:
        raise ConfigError(str(source), problems)
    return settings


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


#: A URL's password (``scheme://user:PASSWORD@host``), masked when settings are printed.
_URL_PASSWORD = re.compile(r"(?<=://)([^:/@]*):[^@/]+@")


def effective_yaml(settings: Settings) -> str:
    """The effective configuration as YAML (paths absolute, defaults filled in; the broker
    URLs' passwords masked)."""
    values = settings.model_dump(mode="json")
    celery = values["jobs"]["celery"]
    for key in ("broker_url", "result_backend"):
        if celery.get(key):
            celery[key] = _URL_PASSWORD.sub(r"\1:**@", celery[key])
    return yaml.safe_dump(values, sort_keys=False, width=100)
