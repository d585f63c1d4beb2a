"""One header reader for series roles: the node's spool and ``vcemri process`` classify a
series with the same code (``synthesis.series_info`` + ``synthesis.series_role``), so an
Enhanced MR post-contrast series, whose contrast agent lives in functional groups and the
Enhanced Contrast/Bolus module rather than in ContrastBolusAgent, is contrast-enhanced to
both and never a model input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedMRImageStorage
from support.models import make_checkpoint
from support.node import query, start_node, wait_for, write_config

import config
from simulation import SimulationOptions, simulate_cohort
from synthesis import find_pair, series_info, series_role

RULES = config.Settings().series_rules


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("roles")
    simulate_cohort(out, SimulationOptions(institutions=("inst2",), patients_per_institution=1,
                                           matrix_scale=0.25, slices=6))
    make_checkpoint(out / "model.safetensors", out, ("inst2",))
    return out


def _enhanced_post_contrast(cohort: Path, path: Path) -> Path:
    """The patient's T1w as one Enhanced MR instance after contrast, described as a plain T1w
    ("T1W_FFE"): the agent is named only where Enhanced MR keeps it (ContrastBolusAgentSequence
    and a ContrastBolusUsageSequence functional group with ContrastBolusAgentAdministered YES)."""
    classic = [pydicom.dcmread(p) for p in sorted((cohort / "inst2" / "inst2-001" / "t1w")
                                                  .glob("*.dcm"))]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        classic, series_instance_uid=hd.UID(), series_number=8, sop_instance_uid=hd.UID(),
        instance_number=1)
    enhanced.SOPClassUID = enhanced.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    assert not enhanced.get("ContrastBolusAgent")  # absent or empty at the top level
    agent = Dataset()
    agent.CodeValue, agent.CodingSchemeDesignator = "C-17800", "SRT"
    agent.CodeMeaning = "Gadolinium"
    agent.ContrastBolusAgentNumber = 1
    enhanced.ContrastBolusAgentSequence = [agent]
    usage = Dataset()
    usage.ContrastBolusAgentNumber = 1
    usage.ContrastBolusAgentAdministered = "YES"
    enhanced.SharedFunctionalGroupsSequence[0].ContrastBolusUsageSequence = [usage]
    enhanced.save_as(path, enforce_file_format=True)
    return path


def test_roles_by_the_default_rules(cohort):
    folder = cohort / "inst2" / "inst2-001"
    roles = {role: series_role(RULES, series_info(pydicom.dcmread(
        next((folder / role).glob("*.dcm")), stop_before_pixels=True)).header())
        for role in ("t1w", "t2w", "ce")}
    assert roles == {"t1w": "t1w", "t2w": "t2w", "ce": "contrast_enhanced"}
    plain = {"Modality": "MR", "SeriesDescription": "t1_tse_tra"}
    assert series_role(RULES, plain) == "t1w"
    assert series_role(RULES, {**plain, "ContrastBolusAgent": "Gd"}) == "contrast_enhanced"
    assert series_role(RULES, {**plain, "Modality": "CT"}) == "other"


def test_an_enhanced_post_contrast_series_is_contrast_enhanced_to_the_node_and_process(
        cohort, tmp_path, send):
    enhanced = _enhanced_post_contrast(cohort, tmp_path / "enhanced.dcm")
    info = series_info(pydicom.dcmread(enhanced, stop_before_pixels=True))
    assert info.contrast_agent and "T1" in info.description.upper()
    t2w = sorted((cohort / "inst2" / "inst2-001" / "t2w").glob("*.dcm"))

    # the node: spooled as contrast-enhanced; its study waits for a T1w, never runs
    root = tmp_path / "root"
    node = start_node(write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors"))
    try:
        result = send([enhanced, *t2w], node.scp.port, called_ae="VCEMRI")
        assert result.returncode == 0, result.output
        rows = wait_for(lambda: query(root, "SELECT series_uid, role FROM series") if len(
            query(root, "SELECT * FROM series WHERE complete_generation IS NOT NULL")) == 2
            else None, 20, "both series complete")
        roles = {r["series_uid"]: r["role"] for r in rows}
        assert roles[info.series_uid] == "contrast_enhanced"
        assert sorted(roles.values()) == ["contrast_enhanced", "t2w"]
        job = wait_for(lambda: query(root, "SELECT * FROM jobs WHERE reason LIKE '%T1w%'"), 20,
                       "the study to wait for its T1w")[0]
        assert job["state"] == "waiting" and job["t1w_series_uid"] is None
    finally:
        node.stop()

    # vcemri process: the same folder has no T1w
    study = tmp_path / "study"
    (study / "enhanced").mkdir(parents=True)
    shutil.copy(enhanced, study / "enhanced" / "1.dcm")
    shutil.copytree(t2w[0].parent, study / "t2w")
    with pytest.raises(config.InputError, match="no T1-weighted series found"):
        find_pair(study, RULES)
    done = subprocess.run([sys.executable, "-m", "vcemri", "process", str(study), "--out",
                           str(tmp_path / "out"), "--model", str(cohort / "model.safetensors")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and "no T1-weighted series found" in done.stderr
