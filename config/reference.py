"""The configuration reference, generated from the pydantic models (``vcemri config reference``).

The README embeds this text between ``<!-- config-reference:start -->`` and
``<!-- config-reference:end -->``; a test keeps the two identical.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from . import types as vtypes
from .settings import Settings

START_MARKER = "<!-- config-reference:start -->"
END_MARKER = "<!-- config-reference:end -->"

_LABELS = {
    vtypes._tcp_port: "TCP port",
    vtypes._ae_title: "AE title",
    vtypes._host: "host",
    vtypes._regex: "regex",
    vtypes._existing_file: "existing file",
    vtypes._device: "device",
    vtypes.resolve_path: "path",
}


def _label_from_metadata(metadata: list[Any]) -> str | None:
    labels = [_LABELS[m.func] for m in metadata if getattr(m, "func", None) in _LABELS]
    if not labels:
        return None
    return "existing file" if "existing file" in labels else labels[0]


def _type_label(annotation: Any, metadata: list[Any] | None = None) -> str:
    label = _label_from_metadata(metadata or [])
    if label:
        return label
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return _type_label(args[0], list(annotation.__metadata__))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_type_label(a) for a in inner)
        return text + " or null" if len(inner) < len(args) else text
    if origin is list:
        return f"list of {_type_label(args[0])}"
    if origin is dict:
        return f"mapping of name to {_type_label(args[1])}"
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if annotation is float:
        return "number"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        try:
            plain = type(value)()
        except ValueError:
            plain = None
        return "" if value == plain else "see default.yaml"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return ""
    if isinstance(value, dict) and value and isinstance(next(iter(value.values())), BaseModel):
        return "see default.yaml"
    if isinstance(value, Path):
        value = str(value)
    return "`" + json.dumps(value).replace("|", "\\|") + "`"


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model nested under a field, and the key suffix that reaches it."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _model_of(inner[0]) if len(inner) == 1 else (None, "")
    if origin is list:
        model, suffix = _model_of(args[0])
        return model, "[]" + suffix
    if origin is dict:
        model, suffix = _model_of(args[1])
        return model, ".<name>" + suffix
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    return None, ""


def _rows(model: type[BaseModel], prefix: str, seen: dict[type[BaseModel], str]) -> list[str]:
    """Table rows for ``model``'s fields; a section type already listed is referred to."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        description = (field.description or "").replace("|", "\\|")
        nested, suffix = _model_of(field.annotation)
        repeat = nested is not None and nested in seen
        if nested is not None and repeat:
            description = (description + "; " if description else "") + f"keys as in `{seen[nested]}`"
        rows.append(
            f"| `{key}` | {_type_label(field.annotation, field.metadata)} | {_default(field)} "
            f"| {description} |"
        )
        if nested is not None and not repeat:
            seen[nested] = key + suffix
            rows.extend(_rows(nested, f"{key}{suffix}.", seen))
    return rows


def reference_markdown() -> str:
    """The configuration reference as a Markdown table."""
    lines = [
        "| Key | Type | Default | Meaning |",
        "|---|---|---|---|",
        *_rows(Settings, "", {}),
    ]
    return "\n".join(lines) + "\n"
