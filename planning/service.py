"""Synthesis to outputs as one service: T1w and T2w in, the TPS's objects out.

The single place that wires ``synthesis`` to the objects planning writes. The node's workers,
``vcemri process`` and ``vcemri evaluate`` all call :class:`SynthesisService`, so what is
evaluated is what is delivered (the same models, options and passes) and the node and the
offline tool never diverge.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import config

if TYPE_CHECKING:
    import synthesis

    from .identity import Supersedes
    from .write import PlanningOutputs


@dataclass
class ProcessedStudy:
    """What :meth:`SynthesisService.process` wrote and the pipeline's summary."""

    out: Path
    outputs: PlanningOutputs
    summary: dict[str, Any]
    device: str
    #: NIfTI copies (VCE, confidence) for people and scripts; never sent
    extras: list[Path] = field(default_factory=list)

    @property
    def objects(self) -> list[synthesis.WrittenObject]:
        """Everything a TPS receives, in sending order: series, RTSTRUCT, review image."""
        return self.outputs.objects()


class SynthesisService:
    """Runs studies through the synthesis pipeline and writes what the TPS receives; one
    loaded model per (checkpoint, device, registration), shared by the node's worker threads
    (inference is serialized per model)."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self._synthesizers: dict[tuple[Any, ...], Any] = {}
        self._locks: dict[tuple[Any, ...], threading.Lock] = {}
        self._guard = threading.Lock()

    def synthesizer(self, model: str = "default", checkpoint: str | None = None,
                    device: str | None = None, align: str = "never", edm: bool = True,
                    confidence: bool = True, keep_t1w_detail: bool | None = None,
                    second_opinion: str | None = None
                    ) -> tuple[synthesis.Synthesizer, threading.Lock]:
        """The loaded pipeline for a configured model (checkpoint and device overridable;
        ``edm`` False switches external distribution matching off, ``confidence`` False the
        mirrored pass and confidence map; ``keep_t1w_detail`` and ``second_opinion`` None: the
        model's settings)."""
        import synthesis

        if model not in self.settings.models:
            raise config.ConfigError("configuration", [f"models: no model named {model!r}"])
        choice = self.settings.models[model]
        detail = choice.keep_t1w_detail if keep_t1w_detail is None else keep_t1w_detail
        second = choice.second_opinion if second_opinion is None else second_opinion
        key = (str(checkpoint or choice.checkpoint), device or choice.device, align, edm,
               confidence, detail, second)
        with self._guard:
            if key not in self._synthesizers:
                options = synthesis.PipelineOptions(device=key[1], batch_size=choice.batch_size,
                                                    align=align,  # type: ignore[arg-type]
                                                    edm=edm, confidence=confidence,
                                                    keep_t1w_detail=detail,
                                                    second_opinion=second)
                self._synthesizers[key] = synthesis.Synthesizer(key[0], options)
                self._locks[key] = threading.Lock()
            return self._synthesizers[key], self._locks[key]

    def synthesize(self, t1w: synthesis.Volume, t2w: synthesis.Volume | None = None, *,
                   model: str = "default", checkpoint: str | None = None,
                   device: str | None = None, align: str = "never",
                   enforce: bool = True, edm: bool = True, confidence: bool = True,
                   keep_t1w_detail: bool | None = None,
                   extra: Mapping[str, synthesis.Volume] | None = None,
                   use: Sequence[str] | None = None,
                   second_opinion: str | None = None) -> synthesis.SynthesisResult:
        """The synthesis result the TPS would receive for these volumes (``extra``: further
        inputs by role, ``use``: what the network may read; ``Synthesizer.run``). With
        ``enforce`` False screening is recorded, not enforced: evaluation scores every
        patient, and an administrator can force a refused study through."""
        synthesizer, lock = self.synthesizer(model, checkpoint, device, align, edm, confidence,
                                             keep_t1w_detail, second_opinion)
        with lock:
            return synthesizer.run(t1w, t2w, enforce=enforce, extra=extra, use=use)

    def process(self, t1w_files: list[Path], t2w_files: list[Path] | None, out: Path, *,
                model: str = "default", checkpoint: str | None = None,
                device: str | None = None, align: str = "never",
                nifti: bool = False, enforce: bool = True,
                supersedes: Supersedes | None = None,
                extra_files: Mapping[str, list[Path]] | None = None) -> ProcessedStudy:
        """Synthesize and write the synthetic series, RTSTRUCT helpers and review image (plus
        the VCE and confidence as NIfTI with ``nifti``) into ``out``, and ``result.json``,
        every object stating the verdict; ``enforce`` False processes a study screening
        refuses (forced: the verdict says so); ``supersedes``: the earlier synthetic series of
        these series (other content) that the new one replaces (the node knows it);
        ``t2w_files`` None and ``extra_files`` (DWI, ...) for a model that reads other inputs.

        Raises ``synthesis.RejectedStudy`` when screening refuses the study (``result.json``
        then holds the screening and the verdict; the exception's ``notice`` is the refusal
        notice written for the TPS when ``planning.refusal_notice`` asks for one, else
        None), or ``config.InputError`` / ``config.ModelError`` with the reason."""
        import pydicom
        import SimpleITK as sitk

        import synthesis

        from .verdict import refused
        from .write import refusal_notice, write_outputs

        t1w = synthesis.read_series(t1w_files)
        t2w = None if t2w_files is None else synthesis.read_series(t2w_files)
        extra = {role: synthesis.read_series(files)
                 for role, files in (extra_files or {}).items()}
        out.mkdir(parents=True, exist_ok=True)
        synthesizer, _ = self.synthesizer(model, checkpoint, device, align)
        try:
            result = self.synthesize(t1w, t2w, model=model, checkpoint=checkpoint,
                                     device=device, align=align, enforce=enforce, extra=extra)
        except synthesis.RejectedStudy as rejected:
            verdict = refused(rejected.screening)
            rejected.notice = None  # type: ignore[attr-defined]
            if self.settings.planning.refusal_notice:
                header = pydicom.dcmread(t1w_files[0], stop_before_pixels=True)
                rejected.notice = refusal_notice(  # type: ignore[attr-defined]
                    header, t1w, t2w, synthesizer.model_info, verdict, out / "refusal.dcm")
            (out / "result.json").write_text(json.dumps(
                {"t1w_series_uid": t1w.info.series_uid,
                 "t2w_series_uid": None if t2w is None else t2w.info.series_uid,
                 "screening": rejected.screening.as_dict(), "verdict": verdict.as_dict(),
                 "model": synthesizer.model_info}, indent=1))
            raise
        header = pydicom.dcmread(t1w_files[0], stop_before_pixels=True)
        written = write_outputs(result, header, out, self.settings.planning, supersedes)
        extras = []
        if nifti:
            sitk.WriteImage(result.vce.image, str(out / "vce.nii.gz"), useCompression=True)
            extras.append(out / "vce.nii.gz")
            if result.confidence is not None:
                sitk.WriteImage(result.confidence, str(out / "confidence.nii.gz"),
                                useCompression=True)
                extras.append(out / "confidence.nii.gz")
        summary = result.summary()
        summary["verdict"] = written.verdict.as_dict()
        summary["outputs"] = {
            "synthetic_series": str(written.series[0].path.parent),
            "synthetic_series_uid": written.series[0].series_instance_uid,
            "supersedes": None if written.supersedes is None else {
                "series_uid": written.supersedes.series_uid, "when": written.supersedes.when,
                "change": written.supersedes.change},
            "rtstruct": None if written.rtstruct is None else str(written.rtstruct.path),
            "review_dicom": str(written.review.path), "review_png": str(written.review_png),
            "notes": written.notes,
        }
        (out / "result.json").write_text(json.dumps(summary, indent=1))
        return ProcessedStudy(out, written, summary, str(synthesizer.predictor.device), extras)
