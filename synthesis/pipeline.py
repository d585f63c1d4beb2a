"""The one synthesis pipeline the node, ``vcemri process`` and the tests share:
study in (T1w and T2w volumes) -> result (VCE-T1w in the T1w's geometry and scanner units, a
confidence map, the institution decision, the EDM factors, the screening outcome, the
alignment and timings).

Steps: pair check -> T2w onto the T1w grid (registered on request) -> input checks ->
background removal -> institution classification -> EDM for external data -> normalization
-> model grid (256 x 224, or a fixed pixel spacing) -> generator (+ mirrored pass for
confidence, features for the OOD score) -> back to the T1w grid -> back to scanner units (T1w
statistics, EDM undone).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from config import InputError

from . import checks, edm
from .alignment import IDENTITY, Alignment, AlignMode, align, field_overlap
from .checkpoint import Checkpoint, load_checkpoint
from .edm import EDMFactors
from .inference import TOLERANCE, Predictor, resolve_device, with_confidence
from .institutions import InstitutionDecision, classify
from .model_inputs import BUILTIN_CHECKPOINT as BUILTIN_CHECKPOINT  # where tests look
from .model_inputs import requirements, resolve_checkpoint
from .normalization import Normalization, Statistics
from .preprocess import GridPolicy, clean_inputs, mask_to_model_grid, to_model_grid
from .screening import FeatureProbe, Screening, input_checks, judge, ood_score
from .series import Volume, check_pair
from .study import INPUT_NAMES, ROLE_NAMES
from .transforms import Chain, ExternalDistributionMatching, ModelGrid, Normalize


class RejectedStudy(InputError):
    """Screening refused the study; ``screening`` holds every reason."""

    def __init__(self, screening: Screening) -> None:
        super().__init__("study rejected by fitness screening: " + "; ".join(screening.reasons))
        self.screening = screening


@dataclass(frozen=True)
class PipelineOptions:
    """How to run: device (auto, cpu, cuda, cuda:N), slices per batch, whether to register the
    T2w (never, auto, always) and from how many mm, the confidence map, screening limits."""

    device: str = "auto"
    batch_size: int = 8
    align: AlignMode = "never"
    align_tolerance_mm: float = 2.0
    confidence: bool = True
    min_slices: int = 5
    screen: bool = True
    #: external distribution matching for unknown institutions (off: a study's own
    #: intensities, e.g. to measure what EDM changes)
    edm: bool = True
    #: add back to the delivered VCE the T1w's detail that the round trip through the
    #: model's 256 x 224 grid removes (the acquired T1w minus the T1w taken to the grid and
    #: back): sharper as delivered where the acquisition is finer than the grid (288, 320,
    #: 512 matrices); the confidence map does not model the detail (README "As delivered")
    keep_t1w_detail: bool = False
    #: a second model ('builtin' or a checkpoint) whose confidence map joins this one's: the
    #: delivered map is the lower of the two per pixel, so a region is flagged where either
    #: model expects an error above TOLERANCE. Why: a model's error head reads its own
    #: decoder, and where the generator does not see a tumour neither does its head; another
    #: model's head may (README, "Unseen protocols": the shipped head flags the tumours the
    #: randomised-sites candidate under-enhances). Costs a second model pass per study.
    second_opinion: str | None = None


@dataclass
class SynthesisResult:
    """Everything the planning outputs and the job record need."""

    vce: Volume
    confidence: sitk.Image | None
    t1w: Volume
    t2w: Volume | None  # on the T1w grid; None when the model was given none
    institution: InstitutionDecision
    edm: EDMFactors
    screening: Screening
    alignment: Alignment
    model: dict[str, Any]
    #: the head on the T1w grid (uint8 image, 1 inside; triangle threshold, holes filled)
    foreground: sitk.Image | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: the VCE on the model's 256 x 224 grid before the way back (scanner units, (slices,
    #: rows, columns), 0 outside the head): where the seeds compute their metrics (for a
    #: model at a fixed pixel spacing, the delivered VCE taken to that grid)
    model_grid: np.ndarray | None = None
    #: scanner units of one normalised unit (the T1w's head standard deviation, EDM undone):
    #: a confidence c means an expected error of TOLERANCE (1 - c) / c of these
    confidence_unit: float | None = None
    #: the model input each series filled ({"t1w": Volume, "dwi": Volume, ...}, on the T1w
    #: grid): what the network saw, in the model's input order
    inputs: dict[str, Volume] = field(default_factory=dict)
    #: with a second opinion (PipelineOptions.second_opinion), each model's own confidence
    #: map before the two were joined into ``confidence`` ({"model": ..., "second_opinion":
    #: ...}, on the T1w grid): which model flagged a region; empty without one
    opinions: dict[str, sitk.Image] = field(default_factory=dict)

    @property
    def input_line(self) -> str:
        """Which series the network was given, for descriptions and captions: 'T1w + T2w'."""
        return " + ".join(INPUT_NAMES.get(r, r) for r in self.inputs)

    def summary(self) -> dict[str, Any]:
        """JSON-able record (UIDs only: no patient identity)."""
        return {
            "t1w_series_uid": self.t1w.info.series_uid,
            "t2w_series_uid": None if self.t2w is None else self.t2w.info.series_uid,
            "inputs": {role: volume.info.series_uid for role, volume in self.inputs.items()},
            "study_uid": self.t1w.info.study_uid,
            "frame_of_reference_uid": self.t1w.info.frame_of_reference_uid,
            "model": self.model,
            "institution": self.institution.as_dict(),
            "edm": self.edm.as_dict(),
            "screening": self.screening.as_dict(),
            "alignment": self.alignment.as_dict(),
            "confidence": None if self.confidence_unit is None else {
                "meaning": confidence_meaning(self.model.get("error_quantile"),
                                              self.model.get("second_opinion") is not None),
                "tolerance_normalized": TOLERANCE,
                "error_quantile": self.model.get("error_quantile"),
                "expected_error_at_0_5_scanner_units": round(
                    TOLERANCE * self.confidence_unit, 3)},
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


def confidence_meaning(error_quantile: float | None, second_opinion: bool = False) -> str:
    """What a confidence c says, for result.json: the error estimate behind it is
    TOLERANCE (1 - c) / c, and which estimate that is (synthesis.inference); with a second
    opinion (``PipelineOptions.second_opinion``) the larger of the two models' estimates."""
    estimate = ("the expected |VCE - CE|" if error_quantile is None else
                f"the |VCE - CE| exceeded with probability {1 - error_quantile:.2g}")
    second = ("; with a second opinion, the lower of this model's c and the second model's "
              "for its own VCE, so 0.5 means either model expects TOLERANCE"
              if second_opinion else "")
    return (f"confidence c: {estimate} is TOLERANCE (1 - c) / c normalised units (T1w head "
            "standard deviations; the larger of the error head's estimate and half the "
            f"mirrored passes' disagreement); 0.5 means TOLERANCE{second}")


class Synthesizer:
    """A loaded model ready to synthesize studies with the given options."""

    def __init__(self, checkpoint: Checkpoint | Path | str,
                 options: PipelineOptions | None = None) -> None:
        self.checkpoint = (checkpoint if isinstance(checkpoint, Checkpoint)
                           else load_checkpoint(resolve_checkpoint(checkpoint)))
        self.options = options or PipelineOptions()
        meta = self.checkpoint.meta
        self.normalization = Normalization(meta.normalization.method,  # type: ignore[arg-type]
                                           meta.normalization.level)  # type: ignore[arg-type]
        self.inputs = tuple(getattr(self.checkpoint.generator, "inputs", ("t1w", "t2w")))
        #: trained with modality dropout (seed 003): any non-empty subset of the inputs works
        self.accepts_subsets = bool(getattr(self.checkpoint.generator, "accepts_subsets",
                                            False))
        self.predictor = Predictor(self.checkpoint.generator, resolve_device(self.options.device),
                                   self.options.batch_size)
        #: the grid the network runs on (the seeds' 256 x 224 matrix, or a fixed spacing)
        self.grid = GridPolicy(*meta.model_grid, meta.model_spacing_mm)
        #: the second opinion's model (PipelineOptions.second_opinion), run for its map only
        self.second: Synthesizer | None = None
        if self.options.second_opinion is not None and self.options.confidence:
            self.second = Synthesizer(self.options.second_opinion, replace(
                self.options, second_opinion=None, keep_t1w_detail=False, screen=False))

    @property
    def model_info(self) -> dict[str, Any]:
        meta = self.checkpoint.meta
        return {"architecture": meta.architecture.name, "path": str(self.checkpoint.path),
                "created": meta.created, "package_version": meta.package_version,
                "weights_sha256": self.checkpoint.weights_sha256,
                "description": meta.description,
                # how the delivered VCE was made (PipelineOptions.keep_t1w_detail)
                "keep_t1w_detail": self.options.keep_t1w_detail,
                "grid": self.grid.describe(),
                # what the error head predicts (None: the expected error)
                "error_quantile": None if meta.confidence is None
                else meta.confidence.error_quantile,
                # whose confidence map joins this one's (PipelineOptions.second_opinion)
                "second_opinion": None if self.second is None else {
                    "path": str(self.second.checkpoint.path),
                    "weights_sha256": self.second.checkpoint.weights_sha256}}

    @property
    def required_inputs(self) -> tuple[str, ...]:
        """The series a study must have for this model (``model_inputs.requirements``)."""
        return requirements(self.inputs, self.accepts_subsets)[0]

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        """Inputs used when present (a model that accepts subsets)."""
        return requirements(self.inputs, self.accepts_subsets)[1]

    def _chosen(self, given: dict[str, Volume], use: Sequence[str] | None) -> tuple[str, ...]:
        """The inputs the network gets: those of its inputs given (and in ``use``); refuses
        a study that misses one the model cannot do without, naming it."""
        chosen = tuple(m for m in self.inputs if m in given and (use is None or m in use))
        missing = [m for m in self.inputs if m not in chosen]
        if missing and not self.accepts_subsets:
            names = " and ".join(f"a {ROLE_NAMES.get(m, m)} series" for m in missing)
            raise InputError(
                f"this model ({self.checkpoint.meta.architecture.name}) needs {names}, which "
                "the study does not have; it takes " + " + ".join(
                    INPUT_NAMES.get(m, m) for m in self.inputs),
                hint="send the missing series, or route the study to a model trained for "
                     "fewer inputs (IMPORTANT-Net with --modality-dropout)")
        if not chosen:
            raise InputError("none of the series this model reads ("
                             + ", ".join(INPUT_NAMES.get(m, m) for m in self.inputs)
                             + ") was given")
        return chosen

    def _dataset_stats(self, modality: str) -> Statistics | None:
        stats = self.checkpoint.meta.normalization.dataset_statistics.get(modality)
        return None if stats is None else Statistics(stats.mean, stats.std, stats.minimum,
                                                     stats.maximum)

    def run(self, t1w: Volume, t2w: Volume | None = None, screen: bool | None = None,
            enforce: bool = True, *, extra: Mapping[str, Volume] | None = None,
            use: Sequence[str] | None = None) -> SynthesisResult:
        """Synthesize the VCE-T1w for one study; raises :class:`RejectedStudy` (with every
        reason) when screening refuses it and :class:`InputError` for unusable input.
        ``screen`` overrides the options' (False: no screening at all); with ``enforce``
        False screening is recorded in the result but refuses nothing (a study an
        administrator forces through). ``extra`` holds further inputs by role (``dwi``, ...)
        and ``use`` limits what the network is given (a model that accepts subsets; the T1w
        still sets the output's grid and scanner units)."""
        screen = self.options.screen if screen is None else screen
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        reasons: list[str] = []
        evidence: dict[str, object] = {}

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = now - clock
            clock = now

        def refuse_if_unfit() -> None:
            if reasons and enforce:
                raise RejectedStudy(judge(reasons, None, None, evidence=evidence))

        given = {"t1w": t1w, **({} if t2w is None else {"t2w": t2w}), **(extra or {})}
        chosen = self._chosen(given, use)
        # the T1w always: its grid, head and statistics are the output's
        others = {m: v for m, v in given.items() if m != "t1w" and m in chosen}
        for role, volume in others.items():
            check_pair(t1w, volume, INPUT_NAMES.get(role, role))
        overlap = min((field_overlap(t1w, v) for v in others.values()), default=1.0)
        meta = self.checkpoint.meta
        if screen:  # before registering: registration needs overlap
            reasons += input_checks(t1w.shape[0], t1w.info.body_part, overlap,
                                    min_slices=self.options.min_slices)
            reasons += checks.header(t1w.info, others["t2w"].info if "t2w" in others
                                     else None)
            spacing = t1w.image.GetSpacing()
            reasons += checks.geometry(spacing[2], min(spacing[:2]), meta.acquisition)
            refuse_if_unfit()
        on_grid: dict[str, Volume] = {"t1w": t1w}
        alignment = Alignment(self.options.align, False, False, IDENTITY, (0.0, 0.0, 0.0),
                              0.0, None, "no other series to align")
        for role, volume in others.items():
            on_grid[role], aligned = align(t1w, volume, self.options.align,
                                           self.options.align_tolerance_mm)
            if role == "t2w" or "t2w" not in others:
                alignment = aligned
        # An implausible registration is not applied and says so (alignment.note): the
        # scanner's alignment is kept and the study is not rejected for it.
        lap("align")

        raw = {m: np.asarray(v.array, np.float32) for m, v in on_grid.items()}
        arrays, masks = clean_inputs(raw)
        if screen:
            spacing = t1w.image.GetSpacing()
            found, evidence = checks.content_checks(raw, masks["t1w"], (spacing[1], spacing[0]),
                                                    masks)
            reasons += found
            refuse_if_unfit()
        means = {k: float(arrays[k][masks[k]].mean()) if masks[k].any() else 0.0
                 for k in arrays}
        lap("background")

        profiles = meta.institutions
        t2w_on_grid = on_grid.get("t2w")
        decision = classify(t1w.info, None if t2w_on_grid is None else t2w_on_grid.info,
                            {m: v for m, v in means.items() if m in edm.MODALITIES}, profiles)
        factors = EDMFactors()
        if self.normalization.scale_invariant:
            factors = edm.not_applicable(self.normalization.describe())
        elif not self.options.edm:
            factors = EDMFactors(note="EDM switched off")
        elif not decision.known and decision.closest is not None:
            reference = next(p for p in profiles if p.key == decision.closest)
            if all(m in means for m in edm.MODALITIES) and all(
                    reference.patient_mean.get(m) for m in edm.MODALITIES) and all(
                    means[m] > 0 for m in edm.MODALITIES):
                factors = edm.factors(reference.patient_mean, means, reference.key)
            elif not all(m in means for m in edm.MODALITIES):
                factors = EDMFactors(note="EDM not applied: it matches the T1w and the T2w "
                                          "together, and the model was given no T2w")
        lap("institution")

        # the way there and, in reverse, the way back (synthesis.transforms)
        normalize = Normalize(self.normalization, masks,
                              {m: self._dataset_stats(m) for m in arrays})
        spacing = t1w.image.GetSpacing()
        to_grid = ModelGrid(self.grid, (spacing[1], spacing[0]), normalize)
        steps = Chain([ExternalDistributionMatching(factors), normalize, to_grid])
        grid = steps.forward(arrays)
        # one normalised unit of the output in the T1w's scanner units (what confidence means)
        unit = float(np.mean([s.std for s in normalize.statistics["t1w"]])) / factors.t1w
        blank = np.zeros_like(grid["t1w"])
        model_inputs = np.stack([grid[m] if m in chosen else blank for m in self.inputs], 1)
        present = [m in chosen for m in self.inputs] if self.accepts_subsets else None
        complete = len(chosen) == len(self.inputs)
        lap("normalize")

        fitness = fitness_threshold = None
        # the fitness classifier reads a T1w and a T2w; the OOD calibration holds for the
        # inputs the model was calibrated with: a subset is judged by the checks above
        if screen and self.checkpoint.fitness is not None and meta.fitness is not None \
                and "t2w" in grid:
            fitness = self.predictor.score(self.checkpoint.fitness,
                                           np.stack([grid[m] for m in ("t1w", "t2w")], 1))
            fitness_threshold = meta.fitness.threshold
        calibration = meta.ood
        probe = None
        if screen and calibration.threshold is not None and complete:
            probe = FeatureProbe(self.predictor.model, calibration.feature)
        guided = self.predictor.guided and meta.confidence is not None
        learned = None
        try:
            output = self.predictor.predict(model_inputs, aux=guided, present=present)
        finally:
            if probe is not None:
                probe.close()
        if guided:
            output, learned = output
        score = None if probe is None else ood_score(probe.study_vector(), calibration)
        confidence = None
        if self.options.confidence:
            mirrored = self.predictor.predict(model_inputs, mirror=True, aux=guided,
                                              present=present)
            if guided:
                mirrored, learned_mirrored = mirrored
                learned = (learned + learned_mirrored) / 2.0
            output, confidence = with_confidence(output, mirrored, learned)
        lap("model")
        screening = judge(reasons, score, calibration if probe is not None else None,
                          fitness, fitness_threshold, evidence)
        if not screening.accepted and enforce:
            raise RejectedStudy(screening)

        def in_head(values: np.ndarray, head: np.ndarray) -> np.ndarray:
            return np.where(head, np.maximum(values, 0.0), 0.0).astype(np.float32)

        restored = steps.inverse(output)
        if self.options.keep_t1w_detail:
            restored += arrays["t1w"] - steps.inverse(grid["t1w"])
        vce = in_head(restored, masks["t1w"])
        if self.grid.spacing_mm is None:
            model_grid = in_head(steps.inverse(output, skip=(ModelGrid.name,)),
                                 mask_to_model_grid(masks["t1w"]))
        else:  # the seeds' grid is not the network's: the delivered VCE taken onto it
            model_grid = in_head(to_model_grid(restored).numpy(), mask_to_model_grid(masks["t1w"]))
        vce_image = sitk.GetImageFromArray(vce)
        vce_image.CopyInformation(t1w.image)
        confidence_image = None
        opinions: dict[str, sitk.Image] = {}
        if confidence is not None:
            back = to_grid.inverse(confidence).clip(0, 1)
            confidence_image = sitk.GetImageFromArray(np.where(masks["t1w"], back, 1.0)
                                                      .astype(np.float32))
            confidence_image.CopyInformation(t1w.image)
            if self.second is not None and t2w is not None:
                other = self.second.run(t1w, t2w, screen=False, enforce=False).confidence
                if other is not None:
                    joined = sitk.GetImageFromArray(np.minimum(
                        sitk.GetArrayFromImage(confidence_image),
                        sitk.GetArrayFromImage(other)).astype(np.float32))
                    joined.CopyInformation(t1w.image)
                    opinions = {"model": confidence_image, "second_opinion": other}
                    confidence_image = joined
                lap("second_opinion")
        head = sitk.GetImageFromArray(masks["t1w"].astype(np.uint8))
        head.CopyInformation(t1w.image)
        lap("restore")
        timings["total"] = sum(timings.values())
        return SynthesisResult(Volume(vce_image, t1w.info, t1w.sources), confidence_image, t1w,
                               t2w_on_grid, decision, factors, screening, alignment,
                               self.model_info, head, timings, model_grid,
                               unit if confidence is not None else None,
                               {m: on_grid[m] for m in self.inputs if m in chosen}, opinions)
