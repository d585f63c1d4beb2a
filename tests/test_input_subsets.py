"""Studies that bring something other than exactly one T1w and one T2w (seed 003): series
roles for fat-suppressed T2w, STIR, DWI and ADC; a DWI series read at its highest b-value;
IMPORTANT-Net trained with modality dropout on T1w, T2w and DWI processing a study that
holds only a T1w (``vcemri process`` and the node), its outputs naming the inputs used; and
MMgSN-Net still refusing a study without a T2w, naming it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from support.node import query, start_node, wait_for, write_config

import config
import planning
from simulation import SimulationOptions, simulate_cohort
from synthesis import (
    PipelineOptions,
    Synthesizer,
    checkpoint_inputs,
    find_inputs,
    load_checkpoint,
    read_series,
    series_info,
    series_role,
)
from training import TrainOptions, train

RULES = config.Settings().series_rules


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("subsets")
    simulate_cohort(out, SimulationOptions(
        institutions=("inst2", "inst3"), patients_per_institution=2, matrix_scale=0.25,
        slices=6, dwi=True), workers=2)
    return out


@pytest.fixture(scope="module")
def important(cohort, tmp_path_factory) -> Path:
    """IMPORTANT-Net on T1w, T2w and DWI with modality dropout: a few steps (mechanics, not
    quality)."""
    out = tmp_path_factory.mktemp("important")
    result = train(cohort / "manifest.csv", out, TrainOptions(
        institutions=("inst2", "inst3"), epochs=1, batch_size=2, width=0.125, device="cpu",
        max_steps=2, architecture="important", inputs=("t1w", "t2w", "dwi"),
        modality_dropout=0.7, fitness_steps=0, crop=(64, 48)))
    return result.checkpoint


def _patient(cohort: Path) -> Path:
    return cohort / "inst3" / "inst3-001"


def test_roles_for_t2w_variants_diffusion_and_adc():
    def role(description: str, **header: object) -> str:
        return series_role(RULES, {"Modality": "MR", "SeriesDescription": description,
                                   **header})

    assert role("t2_tse_tra") == "t2w" and role("AX T2 FRFSE") == "t2w"
    assert role("t2_tse_fs_tra") == "t2w_fs" and role("T2 SPAIR") == "t2w_fs"
    assert role("t2_tse_tra", ScanOptions=["FS"]) == "t2w_fs"  # the header says fat-sat
    assert role("t2_fse_tra") == "t2w"  # FSE is no fat suppression
    assert role("t2_tirm_tra") == "stir" and role("T2W_STIR") == "stir"
    assert role("t1_tirm_tra_dark-fluid") == "t1w"  # a T1 TIRM is no STIR
    assert role("ep2d_diff_tra") == "dwi" and role("anything", DiffusionBValue=800.0) == "dwi"
    assert role("ep2d_diff_tra_ADC") == "adc"
    assert role("anything", ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]) == "adc"
    assert role("ep2d_diff_tra", ContrastBolusAgent="Gd") == "contrast_enhanced"


def test_a_dwi_series_is_read_at_its_highest_b_value(cohort):
    folder = _patient(cohort) / "dwi"
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm")]
    values = sorted({float(ds.DiffusionBValue) for ds in datasets})
    assert values == [0.0, 1000.0]
    volume = read_series(folder)  # two instances per position: one volume, b = 1000
    assert volume.info.b_value == 1000.0
    assert len(volume.sources) == len(datasets) // 2
    high = {ds.SOPInstanceUID for ds in datasets if float(ds.DiffusionBValue) == 1000.0}
    assert {s.sop_instance_uid for s in volume.sources} == high
    assert series_role(RULES, volume.info.header()) == "dwi"
    assert series_role(RULES, read_series(_patient(cohort) / "adc").info.header()) == "adc"


def test_a_t2w_input_takes_a_stir_when_no_plain_t2w_is_there(cohort, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(_patient(cohort) / "t1w", study / "t1w")
    shutil.copytree(_patient(cohort) / "t2w", study / "stir")
    series_uid = pydicom.uid.generate_uid()
    for path in (study / "stir").glob("*.dcm"):  # another series, described as a STIR
        ds = pydicom.dcmread(path)
        ds.SeriesDescription, ds.SeriesInstanceUID = "t2_tirm_tra", series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(path)
    assert series_role(RULES, series_info(pydicom.dcmread(
        next((study / "stir").glob("*.dcm")))).header()) == "stir"
    found = find_inputs(study, RULES, ("t1w", "t2w"))
    assert sorted(p.parent.name for p in found["t2w"])[0] == "stir"
    shutil.copytree(_patient(cohort) / "t2w", study / "t2w-plain")  # a plain T2w wins
    assert {p.parent.name for p in find_inputs(study, RULES, ("t1w", "t2w"))["t2w"]} == {
        "t2w-plain"}


def test_important_net_needs_only_a_t1w(important):
    assert checkpoint_inputs(important) == (("t1w",), ("t2w", "dwi"))
    config_ = load_checkpoint(important).meta.architecture.config
    assert config_["inputs"] == ["t1w", "t2w", "dwi"] and config_["accepts_subsets"] is True


def test_process_with_important_net_on_a_study_holding_only_a_t1w(cohort, important,
                                                                  tmp_path):
    study = tmp_path / "study"
    shutil.copytree(_patient(cohort) / "t1w", study / "t1w")
    t1w_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                for p in (study / "t1w").glob("*.dcm")}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "vcemri", "process", str(study), "--out",
                           str(out), "--model", str(important)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "inputs: T1w " in done.stdout
    summary = json.loads((out / "result.json").read_text())
    assert list(summary["inputs"]) == ["t1w"] and summary["t2w_series_uid"] is None
    series = [pydicom.dcmread(p) for p in sorted((out / "synthetic").glob("*.dcm"))]
    assert len(series) == len(t1w_uids)
    named = {item.ReferencedSOPInstanceUID for ds in series
             for item in ds.SourceImageSequence}
    assert named == t1w_uids  # only T1w slices, every one
    assert all(len(ds.SourceImageSequence) == 1 for ds in series)
    assert series[0].SeriesDescription.endswith("from T1w")
    assert "from the T1w series" in series[0].DerivationDescription
    assert np.isfinite(np.asarray([ds.pixel_array for ds in series], float)).all()


def test_process_uses_the_dwi_when_the_study_has_one(cohort, important, tmp_path):
    study = tmp_path / "study"
    for role in ("t1w", "dwi", "adc"):  # the ADC map is no input of this model
        shutil.copytree(_patient(cohort) / role, study / role)
    dwi = [pydicom.dcmread(p, stop_before_pixels=True) for p in (study / "dwi").glob("*.dcm")]
    high = {ds.SOPInstanceUID for ds in dwi if float(ds.DiffusionBValue) == 1000.0}
    out = tmp_path / "out"
    found = find_inputs(study, RULES, ("t1w", "t2w", "dwi"), ("t1w",))
    assert set(found) == {"t1w", "dwi"}  # no T2w; the ADC map is no input
    done = planning.SynthesisService(config.Settings()).process(
        found.pop("t1w"), None, out, checkpoint=str(important), device="cpu",
        extra_files=found)
    summary = json.loads((out / "result.json").read_text())
    assert list(summary["inputs"]) == ["t1w", "dwi"] == list(done.summary["inputs"])
    series = [pydicom.dcmread(p) for p in sorted((out / "synthetic").glob("*.dcm"))]
    named = {item.ReferencedSOPInstanceUID for ds in series
             for item in ds.SourceImageSequence}
    assert named & high and not named & ({ds.SOPInstanceUID for ds in dwi} - high)
    assert series[0].SeriesDescription.endswith("from T1w + DWI")


def test_a_subset_changes_what_the_network_reads(cohort, important):
    patient = _patient(cohort)
    t1w, t2w = read_series(patient / "t1w"), read_series(patient / "t2w")
    dwi = read_series(patient / "dwi")
    synthesizer = Synthesizer(important, PipelineOptions(device="cpu", confidence=False))
    assert synthesizer.required_inputs == ("t1w",)
    alone = synthesizer.run(t1w, screen=False)
    everything = synthesizer.run(t1w, t2w, screen=False, extra={"dwi": dwi})
    assert list(alone.inputs) == ["t1w"] and list(everything.inputs) == ["t1w", "t2w", "dwi"]
    assert not np.allclose(alone.vce.array, everything.vce.array)
    limited = synthesizer.run(t1w, t2w, screen=False, extra={"dwi": dwi}, use=("t1w",))
    np.testing.assert_array_equal(limited.vce.array, alone.vce.array)


def test_mmgsn_net_still_refuses_a_study_without_a_t2w_naming_it(cohort, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(_patient(cohort) / "t1w", study / "t1w")
    shutil.copytree(_patient(cohort) / "dwi", study / "dwi")
    done = subprocess.run([sys.executable, "-m", "vcemri", "process", str(study), "--out",
                           str(tmp_path / "out"), "--model", "builtin"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and "no T2-weighted series found" in done.stderr
    synthesizer = Synthesizer("builtin")
    with pytest.raises(config.InputError, match="needs a T2-weighted series"):
        synthesizer.run(read_series(study / "t1w"))


def test_the_node_runs_important_net_on_a_t1w_alone_after_waiting_for_the_others(
        cohort, important, tmp_path, send, tps):
    root = tmp_path / "root"
    node = start_node(write_config(
        tmp_path / "node.yaml", root, important,
        destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": tps.port}}))
    try:
        t1w = sorted((_patient(cohort) / "t1w").glob("*.dcm"))
        result = send(t1w, node.scp.port, called_ae="VCEMRI")
        assert result.returncode == 0, result.output
        job = wait_for(lambda: (query(root, "SELECT * FROM jobs WHERE state = 'done'") or
                                [None])[0], 120, "the T1w-only job to finish")
        waited = query(root, "SELECT reason FROM transitions WHERE job_id = ?", job["id"])
        assert any("waiting up to 1 s for the optional T2w and DWI series"
                   in (r["reason"] or "") for r in waited)
        assert job["t2w_series_uid"] is None
        assert "T1w complete; route default" in {r["reason"] for r in waited}
        received = [pydicom.dcmread(p) for p in tps.received()]
        synthetic = [ds for ds in received if ds.Modality == "MR"]
        assert synthetic and all(ds.SeriesDescription.endswith("from T1w")
                                 for ds in synthetic)
        t1w_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in t1w}
        assert {i.ReferencedSOPInstanceUID for ds in synthetic
                for i in ds.SourceImageSequence} == t1w_uids
    finally:
        node.stop()


def test_evaluate_names_a_subset_of_a_checkpoint():
    from training.cli import _model_argument
    from training.evaluate import model_spec

    assert model_spec("run/model.safetensors@t1w+dwi") == (
        Path("run/model.safetensors"), ("t1w", "dwi"))
    assert model_spec("run/model.safetensors") == (Path("run/model.safetensors"), None)
    assert model_spec("odd@name/model.safetensors") == (
        Path("odd@name/model.safetensors"), None)  # not a subset: part of the path
    assert _model_argument("run/model.safetensors@t2w")[0] == "run {T2w}"
    assert _model_argument("mine=run/model.safetensors@t2w")[0] == "mine"


def test_what_a_result_supersedes_names_every_input_that_changed():
    from dicom_node.lineage import input_change

    t1w = [("1.1", "a"), ("1.2", "b")]
    pair = {"t1w": t1w, "t2w": [("2.1", "c")]}
    assert input_change(pair, {**pair, "t1w": [*t1w, ("1.3", "d")]}) == \
        "the T1w gained 1 instance"  # as before for T1w + T2w
    alone, with_dwi = {"t1w": t1w}, {"t1w": t1w, "dwi": [("3.1", "e")]}
    assert input_change(alone, with_dwi) == "the DWI series was added"
    assert input_change(with_dwi, alone) == "the DWI series was left out"
    assert input_change(with_dwi, {"t1w": t1w, "dwi": [("3.1", "f")]}) == \
        "the DWI 1 instance resent with other content"
