"""Which series a checkpoint reads, from its metadata alone (no PyTorch): the node's assembler
decides with it when a study is ready for its route's model, and the pipeline which series it
needs. Also where the shipped model lives and how a checkpoint's header is read.
"""

from __future__ import annotations

import json
from pathlib import Path

from config import ModelError

#: Where the shipped models live (package data).
WEIGHTS = Path(__file__).with_name("weights")

#: The models shipped with vcemri, by the name the configuration and the CLI give them:
#: ``builtin`` is the default; ``builtin:NAME`` another one (README: "Unseen protocols").
BUILTIN_MODELS: dict[str, Path] = {
    "builtin": WEIGHTS / "vcemri-default.safetensors",
    "builtin:randomised-sites": WEIGHTS / "vcemri-randomised-sites.safetensors",
}

#: The default shipped model's file.
BUILTIN_CHECKPOINT = BUILTIN_MODELS["builtin"]

#: The inputs of a model whose configuration names none (MMgSN-Net, Hi-Net).
PAIR = ("t1w", "t2w")


def is_builtin(name: str | Path) -> bool:
    """Whether ``name`` names a shipped model (``builtin`` or ``builtin:NAME``) rather than a
    checkpoint file."""
    return str(name) == "builtin" or str(name).startswith("builtin:")


def resolve_checkpoint(name: str | Path) -> Path:
    """``builtin`` -> the default shipped model, ``builtin:NAME`` another shipped one
    (:data:`BUILTIN_MODELS`); anything else is a path."""
    if not is_builtin(name):
        return Path(name)
    path = BUILTIN_MODELS.get(str(name))
    if path is None:
        raise ModelError(f"there is no built-in model '{name}'",
                         hint="the built-in models are " + ", ".join(BUILTIN_MODELS))
    if not path.is_file():
        raise ModelError(
            f"the built-in model {path} is missing from this installation",
            hint="reinstall vcemri, or pass --model CKPT / set models.default.checkpoint",
        )
    return path


def read_header(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (its JSON header, not the tensors)."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size < 100 * 2**20:
                raise ModelError(f"{path} is not a safetensors checkpoint (bad header size)")
            header = json.loads(handle.read(size))
    except FileNotFoundError:
        raise ModelError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"checkpoint {path} cannot be read: {exc}") from None
    return dict(header.get("__metadata__") or {})


def requirements(inputs: tuple[str, ...], accepts_subsets: bool
                 ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) series for a model reading ``inputs``: every input, or, for a
    model that accepts subsets of them (seed 003, trained with modality dropout), the T1w
    alone with the others optional. A T1w is always required: the VCE is written in the
    T1w's geometry and scanner units, whatever the network reads."""
    if accepts_subsets:
        return ("t1w",), tuple(m for m in inputs if m != "t1w")
    return tuple(dict.fromkeys(("t1w", *inputs))), ()


def checkpoint_inputs(path: str | Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """:func:`requirements` of the checkpoint at ``path`` (``builtin`` allowed), read from
    its metadata."""
    header = read_header(resolve_checkpoint(path))
    try:
        config = json.loads(header["vcemri"])["architecture"].get("config") or {}
    except (KeyError, ValueError, TypeError, AttributeError):
        raise ModelError(f"{path} is not a vcemri checkpoint (no architecture in its "
                         "metadata)") from None
    inputs = tuple(config.get("inputs") or PAIR)
    return requirements(inputs, bool(config.get("accepts_subsets", False)))
