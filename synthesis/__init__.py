"""DICOM series to volumes, preprocessing, institution classification, EDM, fitness
screening, models (MMgSN-Net and baselines), checkpoints and inference: the one pipeline the
node, ``vcemri process`` and the tests share; and the one layer that writes DICOM objects
(``writer``), for planning's outputs and the simulator alike. Imports ``config`` only.
"""

from config import lazy_attributes

# torch, SimpleITK and pydicom load on first use, so `vcemri --help` stays fast.
_LAZY = {
    "Checkpoint": "checkpoint", "CheckpointMeta": "checkpoint", "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint", "InstitutionProfile": "checkpoint",
    "PipelineOptions": "pipeline", "RejectedStudy": "pipeline", "SynthesisResult": "pipeline",
    "Synthesizer": "pipeline", "resolve_checkpoint": "model_inputs",
    "checkpoint_inputs": "model_inputs", "is_builtin": "model_inputs",
    "BUILTIN_MODELS": "model_inputs", "Volume": "series",
    "read_series": "series", "read_volume": "series", "read_image_file": "series",
    "is_image_file": "series",
    "SeriesInfo": "series", "series_info": "series", "unreadable_values": "series", "build_model": "models",
    "find_pair": "study", "find_inputs": "study", "series_role": "study", "ROLES": "study",
    "STANDS_IN": "study", "ROLE_NAMES": "study", "INPUT_NAMES": "study",
    "check_pair": "series", "resample_onto": "alignment", "foreground": "preprocess",
    "field_overlap": "alignment",
    "remove_background": "preprocess", "to_model_grid": "preprocess",
    "mask_to_model_grid": "preprocess",
    "clean_pair": "preprocess", "clean_inputs": "preprocess",
    "Normalization": "normalization", "Statistics": "normalization",
    "NORMALIZATIONS": "normalization", "IntensityStatistics": "checkpoint",
    "FeatureProbe": "screening", "calibrate_ood": "screening", "MIN_OVERLAP": "screening",
    "Architecture": "checkpoint", "NormalizationMeta": "checkpoint",
    "SequenceRange": "checkpoint", "OODCalibration": "checkpoint",
    "FitnessMeta": "checkpoint", "ConfidenceMeta": "checkpoint",
    "AcquisitionRanges": "checkpoint",
    "MODEL_GRID": "preprocess", "inference_device": "inference",
    "GridPolicy": "preprocess", "Placement": "preprocess", "to_canvas": "preprocess",
    "mask_to_canvas": "preprocess",
    "CONFIDENCE_TOLERANCE": "inference", "stated_error": "inference",
    "edm_dataset_mean": "edm",
    "SourceInstance": "series",
    "MANUFACTURER": "writer", "MRImage": "writer", "ImagePlane": "writer",
    "PixelStorage": "writer", "SourceImage": "writer", "Synthetic": "writer",
    "Derivation": "writer", "GENERATORS": "models", "PAINTERS": "models",
    "WrittenObject": "writer", "derived_uid": "writer", "display_window": "writer",
    "software_version": "writer", "sort_along_normal": "writer",
    "synthesizing_equipment": "writer", "write_object": "writer", "write_series": "writer",
}

_RENAMED = {"build_model": "build", "calibrate_ood": "calibrate",
            "inference_device": "resolve_device", "edm_dataset_mean": "dataset_mean",
            "CONFIDENCE_TOLERANCE": "TOLERANCE"}


__getattr__ = lazy_attributes(__name__, _LAZY, _RENAMED)

__all__ = list(_LAZY)
