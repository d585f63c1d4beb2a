"""``vcemri study``: the seeds' studies as designs of arms on one shared split, run end to end
at the smoke scale, resumable, reported."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import fields

import pytest

from training.trainer import TrainOptions, design
from vcemri.study import BASELINE, DESIGNS


def test_every_design_names_real_arms_and_options():
    import training

    assert BASELINE == training.BASELINE
    known = {f.name for f in fields(TrainOptions)}
    for chosen in DESIGNS.values():
        labels = [a.label for a in chosen.arms]
        assert len(set(labels)) == len(labels) and len({a.slug for a in chosen.arms}) == len(labels)
        for arm in chosen.arms:
            assert set(arm.options) <= known, (chosen.name, arm.label)
            assert arm.model_of is None or arm.model_of in labels
        for claim in chosen.claims:
            assert {claim.arm, *claim.versus} <= set(labels)
    baselines = {a.options.get("architecture", "mmgsn") for a in DESIGNS["seed000-baselines"].arms}
    assert baselines == {"mmgsn", "unet", "hinet", "pix2pix", "cyclegan"}
    normalizations = {a.options.get("normalization") for a in
                      DESIGNS["seed001-normalization"].arms if a.model_of is None}
    assert len(normalizations) == 6


def test_a_uni_institution_arm_takes_its_share_of_the_study_split(tmp_path):
    patients = [(f"P{site}{i}", site) for site in ("inst1", "inst2", "inst4") for i in range(6)]
    study = design(patients, TrainOptions(institutions=("inst1", "inst2")))
    (tmp_path / "split.json").write_text(json.dumps(study))
    uni = design(patients, TrainOptions(institutions=("inst1",),
                                        split=str(tmp_path / "split.json")))
    assert uni["train"] == [p for p in study["train"] if p.startswith("Pinst1")]
    assert uni["internal"] == [p for p in study["internal"] if p.startswith("Pinst1")]
    assert set(uni["external"]) == {p for p, s in patients if s != "inst1"}
    mixture = design(patients, TrainOptions(institutions=("inst1", "inst2"),
                                            split=str(tmp_path / "split.json")))
    assert (mixture["train"], mixture["internal"]) == (study["train"], study["internal"])
    from vcemri.cli import build_parser

    args = build_parser().parse_args(["train", "--manifest", "m.csv", "--out", "o", "--split",
                                      str(tmp_path / "split.json")])
    assert args.split == str(tmp_path / "split.json")


def test_the_edm_study_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "edm"
    command = [sys.executable, "-m", "vcemri", "study", "seed000-edm", "--scale", "smoke",
               "--out", str(out), "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training EDM" in done.stderr and "evaluating without EDM" in done.stderr
    report = (out / "report.md").read_text()
    verdict = next(line for line in report.splitlines() if line.startswith("- external, MAE"))
    assert "EDM" in verdict and "reproduced" in verdict
    rows = list(csv.DictReader(open(out / "study.csv", newline="")))
    by = {(r["method"], r["patient"]): float(r["seed000_whole_mae"]) for r in rows}
    internal = {r["patient"] for r in rows if r["group"] == "internal"}
    external = {r["patient"] for r in rows if r["group"] == "external"}
    assert internal and external
    # one model: identical on the training institutions, EDM acts on the external ones
    assert all(by[("EDM", p)] == by[("without EDM", p)] for p in internal)
    assert any(by[("EDM", p)] != by[("without EDM", p)] for p in external)
    assert (out / "mae.png").stat().st_size > 0

    model = out / "runs" / "edm" / "model.safetensors"
    trained = model.stat().st_mtime_ns
    for path in (out / "evaluations" / "without-edm").iterdir():
        path.unlink()
    (out / "report.md").unlink()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stderr and "evaluating without EDM" in again.stderr
    assert model.stat().st_mtime_ns == trained
    assert verdict in (out / "report.md").read_text()


def test_an_unknown_design_is_refused(tmp_path):
    from config import InputError
    from vcemri.study import run_study

    with pytest.raises(InputError, match="unknown study design 'seed009'"):
        run_study("seed009", tmp_path)
