"""One study through the pipeline: T1w and T2w files in, the TPS's objects out.

The single place that wires ``synthesis`` to ``planning``; the node's workers and
``vcemri process`` both call :class:`Processor`, so the two never diverge.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import config


@dataclass
class ProcessedStudy:
    """What :meth:`Processor.process` wrote (paths) and the pipeline's summary."""

    out: Path
    series: list[Path]
    rtstruct: Path | None
    review_dicom: Path
    review_png: Path
    notes: list[str]
    summary: dict[str, Any]
    device: str
    extras: list[Path] = field(default_factory=list)

    @property
    def dicom_files(self) -> list[Path]:
        """Everything a TPS receives, in sending order: series, RTSTRUCT, review image."""
        files = list(self.series)
        if self.rtstruct is not None:
            files.append(self.rtstruct)
        files.append(self.review_dicom)
        return files


class Processor:
    """Runs studies through the synthesis pipeline; one loaded model per configured name,
    shared by the worker threads (inference is serialised per model)."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self._synthesizers: dict[tuple[str, str, str], Any] = {}
        self._locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def synthesizer(self, model: str = "default", checkpoint: str | None = None,
                    device: str | None = None, align: str = "never") -> tuple[Any, threading.Lock]:
        """The loaded pipeline for a configured model (checkpoint and device overridable)."""
        import synthesis

        if model not in self.settings.models:
            raise config.ConfigError("configuration", [f"models: no model named {model!r}"])
        choice = self.settings.models[model]
        key = (checkpoint or choice.checkpoint, device or choice.device, align)
        with self._guard:
            if key not in self._synthesizers:
                options = synthesis.PipelineOptions(device=key[1], batch_size=choice.batch_size,
                                                    align=align)  # type: ignore[arg-type]
                self._synthesizers[key] = synthesis.Synthesizer(key[0], options)
                self._locks[key] = threading.Lock()
            return self._synthesizers[key], self._locks[key]

    def process(self, t1w_files: list[Path], t2w_files: list[Path], out: Path, *,
                model: str = "default", checkpoint: str | None = None,
                device: str | None = None, align: str = "never",
                nifti: bool = False) -> ProcessedStudy:
        """Synthesise and write the synthetic series, RTSTRUCT helpers and review image (plus
        the VCE and confidence as NIfTI with ``nifti``) into ``out``, and ``result.json``.

        Raises ``synthesis.RejectedStudy`` (``result.json`` then holds the screening), or
        ``config.InputError`` / ``config.ModelError`` with the reason."""
        import pydicom
        import SimpleITK as sitk

        import planning
        import synthesis

        synthesizer, lock = self.synthesizer(model, checkpoint, device, align)
        t1w, t2w = synthesis.read_series(t1w_files), synthesis.read_series(t2w_files)
        out.mkdir(parents=True, exist_ok=True)
        try:
            with lock:
                result = synthesizer.run(t1w, t2w)
        except synthesis.RejectedStudy as rejected:
            (out / "result.json").write_text(json.dumps(
                {"t1w_series_uid": t1w.info.series_uid, "t2w_series_uid": t2w.info.series_uid,
                 "screening": rejected.screening.as_dict(), "model": synthesizer.model_info},
                indent=1))
            raise
        header = pydicom.dcmread(t1w_files[0], stop_before_pixels=True)
        written = planning.write_outputs(result, header, out, self.settings.planning)
        extras = []
        if nifti:
            sitk.WriteImage(result.vce.image, str(out / "vce.nii.gz"), useCompression=True)
            extras.append(out / "vce.nii.gz")
            if result.confidence is not None:
                sitk.WriteImage(result.confidence, str(out / "confidence.nii.gz"),
                                useCompression=True)
                extras.append(out / "confidence.nii.gz")
        summary = result.summary()
        summary["outputs"] = {
            "synthetic_series": str(written.series[0].parent),
            "rtstruct": None if written.rtstruct is None else str(written.rtstruct),
            "review_dicom": str(written.review_dicom), "review_png": str(written.review_png),
            "notes": written.notes,
        }
        (out / "result.json").write_text(json.dumps(summary, indent=1))
        return ProcessedStudy(out, written.series, written.rtstruct, written.review_dicom,
                              written.review_png, written.notes, summary,
                              str(synthesizer.predictor.device), extras)
