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
    "read_volume": "series", "read_image_file": "series", "is_image_file": "series",
    "SeriesInfo": "series", "build_model": "models", "find_pair": "study",
    "check_pair": "series", "resample_onto": "alignment", "foreground": "preprocess",
    "field_overlap": "alignment",
    "remove_background": "preprocess", "to_model_grid": "preprocess",
    "mask_to_model_grid": "preprocess",
    "clean_pair": "preprocess",
    "Normalization": "normalization", "Statistics": "normalization",
    "FeatureProbe": "screening", "calibrate_ood": "screening",
    "Architecture": "checkpoint", "NormalizationMeta": "checkpoint",
    "SequenceRange": "checkpoint", "OODCalibration": "checkpoint",
    "MODEL_GRID": "preprocess", "inference_device": "inference",
    "edm_dataset_mean": "edm",
}

_RENAMED = {"build_model": "build", "calibrate_ood": "calibrate",
            "inference_device": "resolve_device", "edm_dataset_mean": "dataset_mean"}


def __getattr__(name: str) -> Any:
    # torch, SimpleITK and pydicom load on first use, so `vcemri --help` stays fast.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        if name == "MODEL_GRID":
            return (module.MODEL_ROWS, module.MODEL_COLUMNS)
        return getattr(module, _RENAMED.get(name, name))
    raise AttributeError(f"module 'synthesis' has no attribute {name!r}")


__all__ = list(_LAZY)
