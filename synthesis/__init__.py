"""DICOM series to volumes, preprocessing, institution classification, EDM, fitness
screening, models (MMgSN-Net and baselines), checkpoints and inference: the one pipeline the
node, ``vcemri process`` and the tests share. Imports ``config`` only.
"""

from typing import Any

_LAZY = {
    "Checkpoint": "checkpoint", "CheckpointMeta": "checkpoint", "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint", "InstitutionProfile": "checkpoint",
    "PipelineOptions": "pipeline", "RejectedStudy": "pipeline", "SynthesisResult": "pipeline",
    "Synthesizer": "pipeline", "Volume": "series", "read_series": "series",
    "SeriesInfo": "series", "build_model": "models", "find_pair": "study",
}


def __getattr__(name: str) -> Any:
    # torch, SimpleITK and pydicom load on first use, so `vcemri --help` stays fast.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, "build" if name == "build_model" else name)
    raise AttributeError(f"module 'synthesis' has no attribute {name!r}")


__all__ = list(_LAZY)
