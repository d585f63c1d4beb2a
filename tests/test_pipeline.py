"""The synthesis pipeline and ``vcemri process``: geometry and units of the output, institution
decisions with evidence, EDM, screening refusals with reasons, deterministic inference.

The checkpoint has random weights (tests/support/models.py): these tests check mechanics,
not image quality, which the training issue measures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from support.models import make_checkpoint

from config import ModelError
from simulation import SimulationOptions, simulate_cohort
from synthesis.checkpoint import IntensityStatistics, NormalizationMeta, load_checkpoint
from synthesis.inference import Predictor, resolve_device
from synthesis.institutions import classify
from synthesis.pipeline import PipelineOptions, RejectedStudy, Synthesizer
from synthesis.preprocess import foreground, from_model_grid
from synthesis.series import Volume, read_series


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline")
    simulate_cohort(out, SimulationOptions(
        institutions=("inst2", "inst3", "inst5"), patients_per_institution=3, matrix_scale=0.25,
        slices=8), workers=2)
    make_checkpoint(out / "model.safetensors", out, ("inst2", "inst3"))
    return out


@pytest.fixture(scope="module")
def synthesizer(cohort) -> Synthesizer:
    return Synthesizer(cohort / "model.safetensors", PipelineOptions(device="cpu"))


def _study(cohort: Path, site: str, n: int = 1):
    folder = cohort / site / f"{site}-{n:03d}"
    return read_series(folder / "t1w"), read_series(folder / "t2w")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vcemri", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_vce_is_in_the_t1w_geometry_and_scanner_units(cohort, synthesizer):
    t1, t2 = _study(cohort, "inst2")
    result = synthesizer.run(t1, t2)
    assert result.vce.image.GetSize() == t1.image.GetSize()
    assert result.vce.image.GetOrigin() == t1.image.GetOrigin()
    assert result.vce.image.GetDirection() == t1.image.GetDirection()
    assert result.vce.image.GetSpacing() == t1.image.GetSpacing()
    confidence = sitk.GetArrayFromImage(result.confidence)
    assert confidence.min() >= 0.0 and confidence.max() <= 1.0
    head = foreground(np.asarray(t1.array))
    assert np.asarray(result.vce.array)[~head].max() == 0.0
    # Patient z-score restored with the T1w's statistics: same scale as the T1w.
    vce = np.asarray(result.vce.array)
    assert 0.1 < vce[vce > 0].mean() / np.asarray(t1.array)[head].mean() < 10
    assert result.institution.known and result.institution.institution == "inst2"
    assert set(result.timings) >= {"align", "model", "total"}
    # The network's own output (where the seeds measure) is what the way back starts from.
    grid = result.model_grid
    assert grid is not None and grid.shape == (vce.shape[0], 256, 224) and grid.min() >= 0
    back = from_model_grid(grid, *vce.shape[1:]).numpy()
    inner = ndimage.binary_erosion(head, iterations=3)
    assert np.median(np.abs(back - vce)[inner]) < 0.02 * vce[inner].mean()


def test_edm_applies_under_dataset_normalization_and_says_it_cannot_elsewhere(cohort):
    options = PipelineOptions(device="cpu", screen=False, confidence=False)
    t1, t2 = _study(cohort, "inst5")
    # Per-patient z-score (what the trainer uses): a global scale cannot reach the model, so
    # EDM is not applied and the result says why instead of printing factors.
    plain = Synthesizer(cohort / "model.safetensors", options).run(t1, t2)
    assert not plain.institution.known and plain.institution.closest in ("inst2", "inst3")
    assert not plain.edm.applied and not plain.edm.applicable
    assert plain.edm.line() == "EDM not applicable: per-patient z-score is scale-invariant"
    assert plain.edm.as_dict()["line"] == plain.edm.line()
    # Scaling the whole study changes nothing (what makes EDM inapplicable).
    scaled_t1 = Volume(sitk.Cast(t1.image, sitk.sitkFloat32) * 3.7, t1.info, t1.sources)
    scaled = Synthesizer(cohort / "model.safetensors", options).run(scaled_t1, t2)
    np.testing.assert_allclose(np.asarray(scaled.vce.array) / 3.7, plain.vce.array,
                               rtol=1e-3, atol=1e-2)
    # The same weights read with dataset-level z-score: an external study gets mu1/mu2.
    checkpoint = load_checkpoint(cohort / "model.safetensors")
    stats = {m: IntensityStatistics(mean=200.0, std=80.0, minimum=0.0, maximum=900.0)
             for m in ("t1w", "t2w")}
    checkpoint.meta = checkpoint.meta.model_copy(update={"normalization": NormalizationMeta(
        method="zscore", level="dataset", dataset_statistics=stats)})
    matched = Synthesizer(checkpoint, options).run(t1, t2)
    assert matched.edm.applied and matched.edm.applicable
    assert matched.edm.t1w != pytest.approx(1.0)
    assert matched.edm.line().startswith("EDM T1w x")


def test_scrubbed_headers_fall_back_on_intensity(cohort, synthesizer):
    t1, t2 = _study(cohort, "inst3", 2)
    anonymous = {"institution_name": "", "station_name": "", "manufacturer": "", "model": "",
                 "field_strength_t": None}
    means = {m: float(np.asarray(v.array)[foreground(np.asarray(v.array))].mean())
             for m, v in (("t1w", t1), ("t2w", t2))}
    profiles = synthesizer.checkpoint.meta.institutions
    # Names gone, protocol kept: closest by TR/TE, not known.
    by_protocol = classify(replace(t1.info, **anonymous), replace(t2.info, **anonymous), means,
                           profiles)
    assert not by_protocol.known and by_protocol.closest == "inst3"
    assert by_protocol.method == "headers"
    # Protocol gone too: the mean intensities decide.
    timing = {"repetition_time_ms": None, "echo_time_ms": None}
    decision = classify(replace(t1.info, **anonymous, **timing),
                        replace(t2.info, **anonymous, **timing), means, profiles)
    assert decision.method == "intensity" and not decision.known
    assert decision.closest == "inst3"
    assert "scrubbed" in decision.evidence[0]
    known = classify(t1.info, t2.info, means, profiles)
    assert known.known and known.institution == "inst3"
    assert any("InstitutionName matches inst3" in e for e in known.evidence)


def test_a_study_of_another_anatomy_is_rejected_with_a_reason(cohort, synthesizer,
                                                               monkeypatch):
    t1, t2 = _study(cohort, "inst2", 2)
    rng = np.random.default_rng(0)
    shape = np.asarray(t1.array).shape
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    pelvis = (((y - shape[1] / 2) / (shape[1] * 0.45)) ** 2
              + ((x - shape[2] / 2) / (shape[2] * 0.3)) ** 2) < 1
    for volume, level in ((t1, 400.0), (t2, 150.0)):
        array = np.where(pelvis, level, 0.0) + rng.normal(0, level * 0.6, shape) * pelvis
        image = sitk.GetImageFromArray(np.abs(array).astype(np.float32))
        image.CopyInformation(volume.image)
        volume.image = image
    with pytest.raises(RejectedStudy, match="holds noise, not anatomy"):
        synthesizer.run(t1, t2)  # the checks that need no model see it first
    # with those checks out of the way, the generator's features are far from its training
    from synthesis import checks

    monkeypatch.setattr(checks, "content_checks", lambda *args: ([], {}))
    with pytest.raises(RejectedStudy, match="unlike the training data: out-of-distribution "
                                            "score .* above the calibrated threshold"):
        synthesizer.run(t1, t2)


def test_wrong_body_part_and_too_few_slices_are_rejected(cohort, synthesizer):
    t1, t2 = _study(cohort, "inst2", 3)
    t1.info = replace(t1.info, body_part="CHEST")
    with pytest.raises(RejectedStudy, match="body part 'CHEST' is not head and neck"):
        synthesizer.run(t1, t2)
    t1, t2 = _study(cohort, "inst2", 3)
    short = Synthesizer(synthesizer.checkpoint, PipelineOptions(device="cpu", min_slices=20))
    with pytest.raises(RejectedStudy, match=r"too few slices: 8 \(at least 20 needed\)") as caught:
        short.run(t1, t2)
    assert caught.value.screening.as_dict()["accepted"] is False


def test_inference_is_deterministic_and_batch_independent():
    torch.manual_seed(1)
    from synthesis.models import build

    model = build("mmgsn", width_multiplier=0.125, output="linear")
    inputs = np.random.default_rng(0).normal(size=(5, 2, 64, 56)).astype(np.float32)
    a = Predictor(model, torch.device("cpu"), batch_size=2).predict(inputs)
    b = Predictor(model, torch.device("cpu"), batch_size=5).predict(inputs)
    c = Predictor(model, torch.device("cpu"), batch_size=2).predict(inputs)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert a.shape == (5, 64, 56)


def test_device_selection():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda")


def test_process_command_writes_a_vce_aligned_with_the_t1w(cohort, tmp_path):
    out = tmp_path / "out"
    done = run_cli("process", str(cohort / "inst2" / "inst2-001"), "--out", str(out),
                   "--model", str(cohort / "model.safetensors"), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "synthetic series: 8 instances in" in done.stdout
    vce = sitk.ReadImage(str(out / "vce.nii.gz"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(cohort / "inst2/inst2-001/t1w")))
    t1 = reader.Execute()
    assert vce.GetSize() == t1.GetSize()
    np.testing.assert_allclose(vce.GetOrigin(), t1.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(vce.GetDirection(), t1.GetDirection(), atol=1e-6)
    summary = json.loads((out / "result.json").read_text())
    assert summary["institution"]["institution"] == "inst2"
    assert summary["screening"]["accepted"] is True
    assert (out / "confidence.nii.gz").exists()
    # The three kinds of objects for the TPS.
    assert len(list((out / "synthetic").glob("*.dcm"))) == vce.GetSize()[2]
    assert pydicom.dcmread(out / "rtstruct.dcm").Modality == "RTSTRUCT"
    assert pydicom.dcmread(out / "review.dcm").SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert (out / "review.png").stat().st_size > 0
    assert summary["outputs"]["rtstruct"].endswith("rtstruct.dcm")
    # Per-patient z-score: EDM says it cannot apply, wherever it is reported.
    note = "EDM not applicable: per-patient z-score is scale-invariant"
    assert note in done.stdout and summary["edm"]["line"] == note
    assert summary["edm"]["applicable"] is False
    first = pydicom.dcmread(next((out / "synthetic").glob("*.dcm")))
    assert note in first.DerivationDescription
    text = (out / "result.json").read_text()
    assert "SIM^" not in text and "SIM-INST" not in text  # no patient identity


def test_process_without_a_t2w_names_what_it_looked_for(cohort, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(cohort / "inst2" / "inst2-001", study)
    shutil.rmtree(study / "t2w")
    done = run_cli("process", str(study), "--out", str(tmp_path / "out"),
                   "--model", str(cohort / "model.safetensors"))
    assert done.returncode == 1
    assert done.stderr.startswith("vcemri: error: no T2-weighted series found (looked for: "
                                  "SeriesDescription matching 't2(?![0-9*])' or 'stir'")
    assert "Traceback" not in done.stderr


def test_process_uses_the_shipped_model_by_default(cohort, tmp_path):
    from synthesis.pipeline import BUILTIN_CHECKPOINT, confidence_meaning

    # this cohort is simulated at a quarter of the matrix (3.2 mm pixels): the shipped model,
    # trained on 0.7-0.9 mm pixels, refuses it, and says so in result.json too
    done = run_cli("process", str(cohort / "inst2" / "inst2-001"), "--out", str(tmp_path / "o"))
    assert done.returncode == 1
    assert "far outside what the model was trained on" in done.stderr
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["model"]["weights_sha256"] == load_checkpoint(BUILTIN_CHECKPOINT).weights_sha256
    assert result["screening"]["accepted"] is False
    # what its confidence map states: the error exceeded with probability 0.3 (README)
    assert result["model"]["error_quantile"] == 0.7
    assert "exceeded with probability 0.3 is TOLERANCE" in confidence_meaning(0.7)
    assert confidence_meaning(None).startswith("confidence c: the expected |VCE - CE| is")


def test_a_models_keep_t1w_detail_setting_reaches_its_pipeline():
    """``models.<name>.keep_t1w_detail`` is what the node and ``vcemri process`` run with
    (SynthesisService), and a caller (``vcemri evaluate``) may override it."""
    import config
    import planning

    service = planning.SynthesisService(config.Settings(
        models={"default": {"keep_t1w_detail": True}, "plain": {}}))
    assert service.synthesizer()[0].options.keep_t1w_detail is True
    assert service.synthesizer("plain")[0].options.keep_t1w_detail is False
    assert service.synthesizer(keep_t1w_detail=False)[0].options.keep_t1w_detail is False
    assert service.synthesizer()[0].model_info["keep_t1w_detail"] is True  # in result.json


def test_a_second_opinion_joins_its_confidence_map_and_nothing_else(cohort):
    """``models.<name>.second_opinion``: the delivered confidence map is the lower of the
    model's and the second model's, per pixel (each kept in ``opinions``); the VCE and the
    screening stay the model's; result.json says whose map joined and what c then means;
    another map gives other UIDs."""
    import config
    import planning
    from planning.identity import result_key
    from synthesis.model_inputs import BUILTIN_CHECKPOINT

    t1, t2 = _study(cohort, "inst5")
    own = Synthesizer(cohort / "model.safetensors", PipelineOptions(device="cpu")).run(
        t1, t2, enforce=False)
    other = Synthesizer(BUILTIN_CHECKPOINT, PipelineOptions(device="cpu")).run(t1, t2,
                                                                                enforce=False)
    joined = Synthesizer(cohort / "model.safetensors", PipelineOptions(
        device="cpu", second_opinion="builtin")).run(t1, t2, enforce=False)
    maps = [sitk.GetArrayFromImage(r.confidence) for r in (own, other, joined)]
    np.testing.assert_array_equal(maps[2], np.minimum(maps[0], maps[1]))
    assert (maps[2] < maps[0]).any()  # the second opinion flags more than the model alone
    for key, alone in (("model", maps[0]), ("second_opinion", maps[1])):  # each map kept
        np.testing.assert_array_equal(sitk.GetArrayFromImage(joined.opinions[key]), alone)
    assert own.opinions == {}
    np.testing.assert_array_equal(joined.vce.array, own.vce.array)
    assert joined.screening.as_dict() == own.screening.as_dict()
    second = joined.model["second_opinion"]
    assert second["weights_sha256"] == other.model["weights_sha256"]
    assert "either model" in joined.summary()["confidence"]["meaning"]
    assert own.model["second_opinion"] is None
    assert "either model" not in own.summary()["confidence"]["meaning"]
    assert result_key(joined) != result_key(own)
    # the setting reaches the node's pipeline; a missing checkpoint is a configuration error
    service = planning.SynthesisService(config.Settings(
        models={"default": {"second_opinion": "builtin"}}))
    assert service.synthesizer(device="cpu")[0].options.second_opinion == "builtin"
    with pytest.raises(ValueError, match="does not exist"):
        config.Settings(models={"default": {"second_opinion": str(cohort / "nowhere.pt")}})


def test_process_rejection_is_recorded(cohort, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(cohort / "inst2" / "inst2-002", study)
    for path in (study / "t1w").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined = "PELVIS"
        ds.save_as(path)
    out = tmp_path / "out"
    done = run_cli("process", str(study), "--out", str(out), "--model",
                   str(cohort / "model.safetensors"))
    assert done.returncode == 1
    assert "body part 'PELVIS' is not head and neck" in done.stderr
    record = json.loads((out / "result.json").read_text())
    assert record["screening"]["accepted"] is False
