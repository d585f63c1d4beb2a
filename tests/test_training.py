"""`vcemri train` (the part that exists so far): manifest checks, the study design, a tiny
training run whose loss falls, and a checkpoint that the pipeline and `vcemri process` use."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from config import InputError
from simulation import SimulationOptions, simulate_cohort
from synthesis import load_checkpoint
from training.dataset import read_manifest
from training.trainer import TrainOptions, design, train


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("training")
    simulate_cohort(out, SimulationOptions(
        institutions=("inst2", "inst3", "inst5"), patients_per_institution=3, matrix_scale=0.25,
        slices=6), workers=2)
    return out


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # on 128 x 112 crops (the CLI's --crop): a quarter of the pixels per step, with the
    # crop's own handlers (BatchNorm recalibration on whole slices) in the run
    result = train(cohort / "manifest.csv", out, TrainOptions(
        institutions=("inst2", "inst3"), epochs=6, batch_size=4, width=0.125, device="cpu",
        fitness_steps=60, crop=(128, 112)))
    return out, result


def test_broken_manifest_lists_every_problem(cohort, tmp_path):
    rows = list(csv.DictReader(open(cohort / "manifest.csv")))
    broken = [r for r in rows if not (r["patient"] == "SIM-INST2-001" and r["role"] == "t2w")]
    broken.append({"patient": "SIM-X", "institution": "inst9", "role": "t1w",
                   "path": "nowhere/t1w"})
    broken.append({"patient": "SIM-Y", "institution": "inst9", "role": "", "path": ""})
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["patient", "institution", "role", "path"])
        writer.writeheader()
        for row in broken:
            writer.writerow({**row, "path": str((cohort / row["path"]).resolve())
                             if row["patient"] != "SIM-X" else row["path"]})
    with pytest.raises(InputError) as caught:
        read_manifest(path)
    message = str(caught.value)
    assert "nowhere/t1w does not exist" in message
    assert "patient SIM-INST2-001 has no t2w" in message
    assert "patient SIM-X has no t2w, ce" in message
    assert ": no role" in message


def test_yaml_and_per_patient_csv_manifests_with_nifti_series_give_the_same_training_data(
        cohort, tmp_path):
    import SimpleITK as sitk

    from synthesis import Normalization, read_series
    from training.dataset import prepare

    entries = [e for e in read_manifest(cohort / "manifest.csv")
               if e.patient in ("SIM-INST2-001", "SIM-INST3-001")]
    items = []
    for entry in entries:
        item = {"patient": entry.patient, "institution": entry.institution,
                "mask": str(entry.paths["mask"])}
        for role in ("t1w", "t2w", "ce"):
            if entry.patient == "SIM-INST3-001":  # DICOM folders for this one
                item[role] = str(entry.paths[role])
                continue
            # stored right-anterior-superior, as NIfTI tools often write: read back as LPS
            image = sitk.DICOMOrient(read_series(entry.paths[role]).image, "RAS")
            item[role] = f"{role}.nii.gz"
            sitk.WriteImage(image, str(tmp_path / item[role]))
        items.append(item)
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump({"patients": items}))
    with open(tmp_path / "wide.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["patient", "institution", "t1w", "t2w", "ce", "mask"])
        writer.writeheader()
        writer.writerows(items)
    from_yaml = read_manifest(tmp_path / "manifest.yaml")
    assert from_yaml == read_manifest(tmp_path / "wide.csv")
    assert [e.paths["t1w"].name for e in from_yaml] == ["t1w.nii.gz", "t1w"]
    normalization = Normalization("zscore", "patient")
    nifti = prepare(from_yaml, tmp_path / "cache-nifti", normalization)
    dicom = prepare(entries, tmp_path / "cache-dicom", normalization)
    np.testing.assert_allclose(np.asarray(nifti.inputs, np.float32),
                               np.asarray(dicom.inputs, np.float32), atol=1e-3)
    np.testing.assert_allclose(np.asarray(nifti.targets, np.float32),
                               np.asarray(dicom.targets, np.float32), atol=1e-3)
    # NIfTI carries no scanner identity: the profile falls back on intensities
    assert nifti.patients[0].header["manufacturer"] == ""
    # mismatched geometry: a CE-T1w written 300 mm away from the T1w is refused, with the reason
    moved = sitk.ReadImage(str(tmp_path / "ce.nii.gz"))
    moved.SetOrigin(tuple(np.add(moved.GetOrigin(), (0.0, 0.0, 300.0))))
    sitk.WriteImage(moved, str(tmp_path / "ce-moved.nii.gz"))
    items[0]["ce"] = "ce-moved.nii.gz"
    (tmp_path / "moved.yaml").write_text(yaml.safe_dump(items))
    with pytest.raises(InputError, match=r"SIM-INST2-001: its ce covers 0% of the T1w's field"):
        prepare(read_manifest(tmp_path / "moved.yaml"), tmp_path / "cache-moved", normalization)

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump([
        {"patient": "P1", "institution": "x", "t1w": "t1w.nii.gz", "t2w": "t2w.nii.gz",
         "contrast": "ce.nii.gz"}, "not a patient"]))
    with pytest.raises(InputError) as caught:
        read_manifest(tmp_path / "bad.yaml")
    message = str(caught.value)
    assert "patient entry 1: unknown key(s) contrast" in message
    assert "patient entry 1: no path" in message  # its ce
    assert "patient entry 2: not a mapping" in message


def test_study_design_is_a_balanced_mixture_with_a_patient_split():
    patients = [(f"a{i}", "inst1") for i in range(10)] + [(f"b{i}", "inst2") for i in range(7)]
    patients += [(f"c{i}", "inst4") for i in range(4)]
    split = design(patients, TrainOptions(institutions=("inst1", "inst2"), seed=3))
    assert len(split["external"]) == 4 and all(p.startswith("c") for p in split["external"])
    assert len(split["dropped"]) == 3  # inst1 cut to inst2's 7
    used = split["train"] + split["internal"]
    assert sum(p.startswith("a") for p in used) == sum(p.startswith("b") for p in used) == 7
    assert len(split["internal"]) == 2 * round(0.3 * 7)
    assert not set(split["train"]) & set(split["internal"])
    assert design(patients, TrainOptions(institutions=("inst1", "inst2"), seed=3)) == split
    with pytest.raises(InputError, match="no patients from training institution"):
        design(patients, TrainOptions(institutions=("inst7",)))


def test_a_tiny_training_run_lowers_its_loss(run):
    out, result = run
    log = list(csv.DictReader(open(out / "training_log.csv")))
    l1 = np.array([float(row["loss_l1"]) for row in log])
    assert len(l1) == result.steps >= 10
    assert l1[-4:].mean() < 0.9 * l1[:4].mean()
    split = json.loads((out / "split.json").read_text())
    assert split == result.split and split["external"]


def test_cached_inputs_and_targets_are_the_three_different_series(run):
    from training.dataset import SliceCache

    out, result = run
    cache = SliceCache(next((out / "cache").iterdir()))
    rows = cache.rows({result.split["train"][0]})
    x = np.asarray(cache.inputs[rows], np.float32)
    y = np.asarray(cache.targets[rows], np.float32)
    assert x.shape[1:] == (2, 256, 224) and y.shape[1:] == (256, 224)
    assert np.abs(x[:, 0] - x[:, 1]).mean() > 0.1  # T1w and T2w differ
    assert np.abs(x[:, 0] - y).mean() > 0.01  # the CE target is not the T1w
    head = x[:, 0] > x[:, 0].min()
    assert y[head].mean() > x[:, 0][head].mean()  # contrast enhances on average


def test_the_checkpoint_carries_what_inference_needs(run):
    out, result = run
    checkpoint = load_checkpoint(result.checkpoint)
    meta = checkpoint.meta
    assert [p.key for p in meta.institutions] == ["inst2", "inst3"]
    for profile in meta.institutions:
        assert profile.institution_names and profile.patient_mean["t1w"] > 0
        assert profile.sequences["t1w"].repetition_time_ms is not None
    assert meta.ood.threshold is not None and meta.ood.feature == "decode1"
    assert meta.training["steps"] == result.steps
    assert "internal_l1_t1w_copy_normalized" in meta.metrics
    assert checkpoint.discriminator is not None
    # seed 002's confidence module, with the lambda that says what its confidence means
    assert meta.architecture.config["confidence"] is True
    assert meta.confidence is not None and meta.confidence.loss_lambda in (0.1, 0.03)
    # seed 000's fitness classifier, calibrated on the internal patients
    assert checkpoint.fitness is not None and meta.fitness is not None
    assert meta.fitness.calibration["patients"] == len(json.loads(
        (out / "split.json").read_text())["internal"])
    assert meta.fitness.calibration["false_refusals"] <= 0.05
    assert set(meta.fitness.calibration["detected"]) == set(meta.fitness.faults)
    assert meta.acquisition.slice_spacing_mm and meta.acquisition.pixel_spacing_mm
    log = list(csv.DictReader(open(out / "training_log.csv")))
    assert {"loss_cm", "confidence"} <= set(log[0])


def test_train_then_process(run, cohort, tmp_path):
    out, result = run
    study = cohort / "inst2" / "inst2-002"
    done = subprocess.run(
        [sys.executable, "-m", "vcemri", "process", str(study), "--out", str(tmp_path / "o"),
         "--model", str(result.checkpoint), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "o" / "result.json").read_text())
    assert summary["institution"]["institution"] == "inst2"
    assert summary["institution"]["known"] is True


def test_evaluate_tabulates_internal_and_external_against_the_baseline(run, cohort, tmp_path):
    from training.evaluate import evaluate, write

    out, result = run
    evaluation = evaluate(result.checkpoint, cohort / "manifest.csv", device="cpu")
    groups = {(r["group"], r["institution"]) for r in evaluation.rows}
    assert ("external", "inst5") in groups and ("internal", "inst2") in groups
    assert {r["method"] for r in evaluation.rows} == {"model", "VCE = T1w"}
    for row in evaluation.rows:
        for grid in ("", "acquired_"):
            assert np.isfinite(row[f"{grid}seed000_whole_mae"])
            assert 0 < row[f"{grid}seed000_whole_ssim"] <= 1
            # inside the head the zeroed background no longer flatters SSIM and MAE
            assert row[f"{grid}seed000_head_ssim"] < row[f"{grid}seed000_whole_ssim"]
            assert row[f"{grid}seed000_head_mae"] > row[f"{grid}seed000_whole_mae"]
            assert np.isfinite(row[f"{grid}seed000_tumour_mae"])  # the simulator's masks
    for row in evaluation.rows:  # the confidence map against the actual error, per patient
        assert np.isfinite(row["confidence_spearman"]) == (row["method"] == "model")
        assert -1 <= row["tumour_excess_ce"] and row["screening_accepted"] in ("", 0, 1)
    sites = {(r["group"], r["institution"]) for r in evaluation.reliability}
    assert sites == groups and all(0 <= r["auroc_top10"] <= 1 for r in evaluation.reliability)
    assert all(r["model"] == "model" and 0 <= r["head_flagged_percent"] <= 100
               and 0 <= r["above_stated_percent"] <= 100 for r in evaluation.reliability)
    training = set(json.loads((out / "split.json").read_text())["train"])
    assert set(evaluation.left_out) == training
    assert not training & {r["patient"] for r in evaluation.rows}
    written = write(evaluation, tmp_path)
    markdown = written["markdown"].read_text()
    assert "| external | inst5 | model |" in markdown
    assert f"- {len(training)}: the model was trained on this patient" in markdown
    assert len(list(csv.DictReader(open(written["csv"])))) == len(evaluation.rows)
    page = written["html"].read_text()
    assert "Confidence map against the actual error" in markdown
    for name in ("example-inst2.png", "example-inst5.png", "training-curves.png",
                 "reliability.png"):
        assert (tmp_path / name).stat().st_size > 10_000 and name in page
    tests = list(csv.DictReader(open(written["significance"])))
    assert {(t["group"], t["method"], t["versus"]) for t in tests} >= {
        ("external", "model", "VCE = T1w"), ("internal", "model", "VCE = T1w")}


def test_evaluate_scores_what_process_delivers(run, cohort, tmp_path):
    """The T1w-grid figures of evaluate are those of the series ``vcemri process`` writes
    (the same service: the mean of the plain and mirrored passes, the way back), up to the
    rounding of stored pixels."""
    from training.evaluate import evaluate
    from training.metrics import study_metrics

    _, result = run
    study = cohort / "inst5" / "inst5-001"
    manifest = tmp_path / "one.yaml"
    manifest.write_text(json.dumps([{  # YAML is a superset of JSON
        "patient": "SIM-INST5-001", "institution": "inst5",
        **{role: str(study / role) for role in ("t1w", "t2w", "ce")}}]))
    row = next(r for r in evaluate(result.checkpoint, manifest, device="cpu").rows
               if r["method"] == "model")
    done = subprocess.run(
        [sys.executable, "-m", "vcemri", "process", str(study), "--out", str(tmp_path / "o"),
         "--model", str(result.checkpoint), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    from synthesis import read_series, resample_onto

    delivered = read_series(tmp_path / "o" / "synthetic")
    t1 = read_series(study / "t1w")
    ce = resample_onto(read_series(study / "ce"), t1).array
    head = delivered.array > 0
    ours = study_metrics(np.where(head, ce, 0.0), delivered.array, None, head)
    assert ours["seed000_head_mae"] == pytest.approx(row["acquired_seed000_head_mae"], abs=0.5)


def test_evaluate_recomputes_the_split_of_a_checkpoint_without_its_run(run, cohort, tmp_path):
    import shutil

    from training.evaluate import _split, evaluate, write

    out, result = run
    alone = tmp_path / "copied.safetensors"
    shutil.copy(result.checkpoint, alone)
    entries = read_manifest(cohort / "manifest.csv")
    assert _split(alone, load_checkpoint(alone), entries) == json.loads(
        (out / "split.json").read_text())
    elsewhere = [e for e in entries if e.institution == "inst5"]  # no training institution
    why: list[str] = []
    assert _split(alone, load_checkpoint(alone), elsewhere, why_none=why) == {}
    assert "no patients from training institution(s) inst2, inst3" in why[0]
    # and evaluate says so where its tables are, instead of grouping them silently as 'all'
    manifest = tmp_path / "inst5.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["patient", "institution", "role", "path"])
        writer.writeheader()
        for row in csv.DictReader(open(cohort / "manifest.csv")):
            if row["institution"] == "inst5" and row["patient"].endswith("001"):
                writer.writerow({**row, "path": str((cohort / row["path"]).resolve())})
    found = evaluate({"model": alone}, manifest, device="cpu")
    assert {row["group"] for row in found.rows} == {"all"}
    assert found.no_split.startswith("No split for model: no patients from training")
    assert found.no_split in write(found, tmp_path / "eval")["markdown"].read_text()
    # another simulated cohort (another seed): the same patient IDs are other people
    other = tmp_path / "other"
    other.mkdir()
    options = json.loads((cohort / "cohort.json").read_text())["options"]
    (other / "cohort.json").write_text(json.dumps({"options": {**options, "seed": 99}}))
    unseen = _split(alone, load_checkpoint(alone), entries, other / "manifest.csv")
    assert set(unseen) == {"internal", "external"} and not unseen["internal"] == []
    assert {e.patient for e in entries if e.institution == "inst5"} == set(unseen["external"])
    # the same people (the seed) with extra lesions and options a later simulator added (an
    # older checkpoint does not record them): the training patients stay out of the tests
    (other / "cohort.json").write_text(json.dumps({"options": {
        **options, "lesions": 2, "randomized": 4, "families": [["t1w", "IR"]]}}))
    assert _split(alone, load_checkpoint(alone), entries, other / "manifest.csv") == json.loads(
        (out / "split.json").read_text())


def test_paired_tests_give_the_exact_wilcoxon_p_values_computed_by_hand():
    """Exact two-sided signed-rank p-values, counted by hand from the 2^n equally likely sign
    patterns: n = 5 differences all favouring one method: W = 0, p = 2/32 = 0.0625 (the
    smallest p five pairs can give); n = 8 with ranks 1 and 2 on the other side: W = 3, and
    the rank subsets summing to 3 or less are {}, {1}, {2}, {3}, {1, 2}: p = 2 * 5/256 =
    0.0390625 (and W = 3 is the two-sided 5 % critical value of published tables for n = 8)."""
    from training.report import paired_tests, tests_markdown

    def rows(differences: list[float]) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for k, d in enumerate(differences):
            out += [{"patient": f"p{k}", "group": "g", "method": "a", "mae": 10.0 + d},
                    {"patient": f"p{k}", "group": "g", "method": "VCE = T1w", "mae": 10.0}]
        return out

    five = paired_tests(rows([-1.0, -2.0, -3.0, -4.0, -5.0]), (("mae", "MAE"),))[0]
    assert (five["n"], five["mean_difference"]) == (5, -3.0)
    assert five["p_value"] == pytest.approx(0.0625, abs=1e-12)
    eight = paired_tests(rows([1.0, 2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0]),
                         (("mae", "MAE"),))[0]
    assert eight["p_value"] == pytest.approx(0.0390625, abs=1e-12)
    assert "(n < 6: >= 0.0625 whatever the data)" in tests_markdown([five])
    assert "whatever the data" not in tests_markdown([eight])


def test_paired_tests_compare_models_pairwise():
    from training.report import paired_tests

    rng = np.random.default_rng(1)
    rows = []
    for patient in range(8):
        base = rng.normal(10, 2)
        for method, shift in (("a", -1.0), ("b", -0.2), ("VCE = T1w", 0.0)):
            rows.append({"patient": f"p{patient}", "group": "external", "method": method,
                         "mae": base + shift + rng.normal(0, 0.3)})
    tests = paired_tests(rows, (("mae", "MAE"),))
    assert {(t["method"], t["versus"]) for t in tests} == {("a", "VCE = T1w"),
                                                          ("b", "VCE = T1w"), ("a", "b")}
    a_vs_base = next(t for t in tests if (t["method"], t["versus"]) == ("a", "VCE = T1w"))
    assert a_vs_base["p_value"] < 0.01 and a_vs_base["mean_difference"] < -0.5


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(cohort, tmp_path):
    import torch

    # the learning rate decays over epochs 2 and 3, and the run is interrupted in epoch 2:
    # the scheduler's state must survive the interruption for epoch 3 to be right; the
    # augmentation's and the crops' draws must not depend on where the run restarted (small
    # crops also keep the test fast)
    options = TrainOptions(institutions=("inst2", "inst3"), epochs=3, batch_size=4,
                           width=0.125, device="cpu", checkpoint_every=2, decay_epochs=2,
                           fitness_steps=0, augment=0.3, crop=(64, 56))
    whole = train(cohort / "manifest.csv", tmp_path / "whole", options)
    stopped = train(cohort / "manifest.csv", tmp_path / "parts",
                    TrainOptions(**{**options.__dict__, "max_steps": whole.steps // 3 + 1}))
    state = torch.load(tmp_path / "parts" / "training_state.pt", weights_only=True)
    assert state["step"] == stopped.steps < whole.steps
    assert state["epoch"] == 2 and state["schedulers"]["opt_g"]["last_epoch"] == 1
    resumed = train(cohort / "manifest.csv", tmp_path / "parts", options, resume=True)
    assert resumed.steps == whole.steps
    a = load_checkpoint(whole.checkpoint).generator.state_dict()
    b = load_checkpoint(resumed.checkpoint).generator.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    log = list(csv.DictReader(open(tmp_path / "parts" / "training_log.csv")))
    assert [int(r["step"]) for r in log] == list(range(1, whole.steps + 1))
    # the training time counts on across the interruption
    seconds = [float(r["seconds"]) for r in log]
    assert seconds == sorted(seconds) and resumed.seconds >= seconds[stopped.steps - 1]
    with pytest.raises(InputError, match="other training options"):
        train(cohort / "manifest.csv", tmp_path / "parts",
              TrainOptions(**{**options.__dict__, "width": 0.25}), resume=True)


def test_ddp_with_two_cpu_processes_matches_one_process(cohort, tmp_path):
    """torchrun, gloo, 2 processes x 2 slices against 1 process x 4 slices in 2 micro-batches
    of the same 2 slices each (--micro-batches 2: per-part BatchNorm statistics, as each rank
    has; SyncBatchNorm does not exist on CPU), both augmented (each slice's draws keyed by
    the slice, not by the rank that reads it). Both ranks end with identical parameters (their
    checksums, recorded in the checkpoint, are equal), and the single process's parameters
    agree with them to float32 arithmetic: gradients are averaged by gloo's all-reduce in one
    run and by autograd's sum in the other; their rounding (~1e-7 relative) is what differs,
    and Adam's normalisation (m / sqrt(v)) amplifies it for parameters whose gradient is near
    zero, where a rounding can turn a whole lr-sized step. Measured 1.5e-4 of the training
    update over these 4 augmented steps (1.1e-3 when the test ran them unaugmented: how much
    the rounding turns depends on the data); asserted < 5e-3. A rank that
    skipped the all-reduce would differ from its peer (the checksums) and from the single
    process by the update of a different half-batch, of the order of the update itself."""
    import shutil

    import torch

    from synthesis import build_model

    torchrun = shutil.which("torchrun")
    assert torchrun is not None, "torchrun comes with torch"
    common = ["--manifest", str(cohort / "manifest.csv"), "--institutions", "inst2,inst3",
              "--epochs", "1", "--batch-size", "4", "--width", "0.125", "--device", "cpu",
              "--max-steps", "4", "--fitness-steps", "0", "--augment", "0.3", "--quiet"]
    single = train(cohort / "manifest.csv", tmp_path / "single", TrainOptions(
        institutions=("inst2", "inst3"), epochs=1, batch_size=4, width=0.125, device="cpu",
        max_steps=4, micro_batches=2, fitness_steps=0, augment=0.3))
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("VCEMRI_")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "vcemri",
                           "train", "--out", str(tmp_path / "ddp"), *common],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = load_checkpoint(tmp_path / "ddp" / "model.safetensors")
    assert ddp.meta.training["processes"] == 2 and ddp.meta.training["steps"] == 4
    ranks = ddp.meta.training["rank_weights_sha256"]
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    single_checkpoint = load_checkpoint(single.checkpoint)
    torch.manual_seed(0)
    initial = build_model("mmgsn", **single_checkpoint.meta.architecture.config).state_dict()
    one = single_checkpoint.generator.state_dict()
    two = ddp.generator.state_dict()
    learned = [k for k in one if one[k].is_floating_point() and "running" not in k]
    update = sum(float((one[k] - initial[k]).float().norm()) for k in learned)
    apart = sum(float((one[k] - two[k]).float().norm()) for k in learned)
    print(f"DDP against one process: {apart / update:.1e} of the training update")

    assert update > 0 and apart < 5e-3 * update, (apart, update)
    log = list(csv.DictReader(open(tmp_path / "ddp" / "training_log.csv")))
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4]
    assert list((tmp_path / "ddp" / "tensorboard").glob("events.out.tfevents.*"))


def test_training_across_two_nodes_with_c10d_rendezvous(cohort, tmp_path):
    """Two machines stood in for by two ``torchrun --nnodes 2 --nproc-per-node 1`` launches on
    loopback, meeting through the c10d rendezvous (README: training across machines): one
    job of 2 processes, whichever launch became node 0 writes the checkpoint into the shared
    --out (its cache, written by rank 0 and read by rank 1 after the barrier), and both ranks
    end with identical parameters (their checksums), so the gradients crossed the nodes."""
    import os
    import shutil

    from support.processes import free_port

    torchrun = shutil.which("torchrun")
    assert torchrun is not None, "torchrun comes with torch"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VCEMRI_")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    port = free_port()
    launch = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "vcemri-test",
              "--max-restarts", "0", "-m", "vcemri", "train", "--out", str(tmp_path / "shared"),
              "--manifest", str(cohort / "manifest.csv"), "--institutions", "inst2,inst3",
              "--epochs", "1", "--batch-size", "4", "--width", "0.125", "--device", "cpu",
              "--max-steps", "2", "--fitness-steps", "0", "--quiet"]
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    trained = load_checkpoint(tmp_path / "shared" / "model.safetensors")
    assert trained.meta.training["processes"] == 2 and trained.meta.training["steps"] == 2
    ranks = trained.meta.training["rank_weights_sha256"]
    assert len(ranks) == 2 and ranks[0] == ranks[1]


def test_every_architecture_trains_under_ddp_with_two_processes(tmp_path):
    """Two steps of every trainable generator (and MMgSN-Net's ablations, and micro-batches)
    under torchrun with 2 gloo processes, each rank on its own random slices, through the
    trainer's own objectives (tests/support/ddp_steps.py). Hi-Net used to fail on the second
    step ("Expected to have finished reduction in the prior iteration": its modality
    decoders took no part in a step); now it learns them (its reconstruction loss) and DDP
    tolerates a model with idle parameters anyway (static graph: measured on the old Hi-Net,
    it trains with those parameters unchanged). Equal parameter checksums on both ranks show
    the gradients were averaged: the ranks saw different slices."""
    import shutil

    from synthesis import GENERATORS

    torchrun = shutil.which("torchrun")
    assert torchrun is not None, "torchrun comes with torch"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("VCEMRI_")}
    env["OMP_NUM_THREADS"] = "1"
    script = Path(__file__).parent / "support" / "ddp_steps.py"
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(script),
                           str(tmp_path / "ddp.json")], capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "ddp.json").read_text())
    assert {name.split("-")[0] for name in report} == set(GENERATORS)
    for name, run in report.items():
        assert run["steps"] == 2
        first, second = run["rank_checksums"]
        assert first == second, name
        assert run["unchanged"] == [], (name, run["unchanged"])
    assert "loss_rec" in report["hinet"]["losses"]
    assert "loss_rec" in report["important"]["losses"]


def test_dataset_level_min_max_is_trained_stored_and_lets_edm_act(cohort, tmp_path):
    """Seed 001's normalizations are a training option stored in the checkpoint: min-max at
    dataset level divides by the training patients' pooled head statistics (equal to those
    of all their head voxels together), trains a tanh generator, and at inference EDM
    applies to an external institution (it cannot under the scale-invariant per-patient or
    per-slice normalizations)."""
    from synthesis import Normalization, Statistics, Synthesizer, read_series
    from training.dataset import _load

    result = train(cohort / "manifest.csv", tmp_path / "minmax", TrainOptions(
        institutions=("inst2", "inst3"), epochs=1, batch_size=4, width=0.125, device="cpu",
        max_steps=2, fitness_steps=0, normalization="minmax-dataset"))
    checkpoint = load_checkpoint(result.checkpoint)
    stored = checkpoint.meta.normalization
    assert (stored.method, stored.level) == ("minmax", "dataset")
    assert checkpoint.meta.architecture.config["output"] == "tanh"
    entries = {e.patient: e for e in read_manifest(cohort / "manifest.csv")}
    heads = {"t1w": [], "t2w": []}
    for patient in result.split["train"]:
        _, clean, masks = _load(entries[patient])
        for role in heads:
            heads[role].append(clean[role][masks[role]])
    for role in heads:
        expected = Statistics.of(np.concatenate(heads[role]))
        got = stored.dataset_statistics[role]
        assert got.mean == pytest.approx(expected.mean, rel=1e-6)
        assert got.std == pytest.approx(expected.std, rel=1e-5)
        assert (got.minimum, got.maximum) == (expected.minimum, expected.maximum)
    external = next(e for e in entries.values() if e.institution == "inst5")
    done = Synthesizer(checkpoint).run(read_series(external.paths["t1w"]),
                                       read_series(external.paths["t2w"]), screen=False)
    assert done.edm.applicable and done.edm.applied and done.edm.t1w != 1.0
    assert np.isfinite(done.vce.array).all()

    assert Normalization.named("zscore-image").scale_invariant
    assert Normalization.named("zscore-image").name == "zscore-image"
    with pytest.raises(InputError, match="unknown normalization 'zscore-site'"):
        train(cohort / "manifest.csv", tmp_path / "bad", TrainOptions(
            institutions=("inst2", "inst3"), normalization="zscore-site"))


def test_the_same_command_trains_baselines_and_ablations(cohort, tmp_path):
    from synthesis import Synthesizer

    for name, extra in (("unet", {"inputs": ("t1w",)}), ("hinet", {}),
                        ("important", {"inputs": ("t1w", "t2w")}),
                        ("pix2pix", {"inputs": ("t1w", "t2w")}),
                        ("mmgsn", {"fusion": "concat", "multi_level": False,
                                   "attention": False})):
        result = train(cohort / "manifest.csv", tmp_path / name, TrainOptions(
            institutions=("inst2", "inst3"), epochs=1, batch_size=4, width=0.125,
            device="cpu", max_steps=2, architecture=name, fitness_steps=0, **extra))
        checkpoint = load_checkpoint(result.checkpoint)
        assert checkpoint.meta.architecture.name == name
        for key, value in extra.items():
            stored = checkpoint.meta.architecture.config[key]
            assert (tuple(stored) if isinstance(stored, list) else stored) == value
        assert Synthesizer(checkpoint).inputs == tuple(extra.get("inputs", ("t1w", "t2w")))


def test_modality_dropout_hides_random_proper_subsets_reproducibly():
    from training.objectives import ModalityDropout

    dropout = ModalityDropout(3, 0.5, seed=4)
    draws = [dropout.draw() for _ in range(400)]
    assert all(any(d) for d in draws)  # never every input hidden
    hidden = [d for d in draws if not all(d)]
    assert 0.4 < len(hidden) / len(draws) < 0.6
    assert {sum(d) for d in hidden} == {1, 2}
    resumed = ModalityDropout(3, 0.5, seed=4)
    resumed.load_state_dict({"draws": 200})
    assert [resumed.draw() for _ in range(200)] == draws[200:]
    assert ModalityDropout(1, 1.0, seed=0).draw() == [True]


def test_important_net_trained_with_modality_dropout_accepts_subsets(cohort, tmp_path):
    result = train(cohort / "manifest.csv", tmp_path / "important", TrainOptions(
        institutions=("inst2", "inst3"), epochs=1, batch_size=4, width=0.125, device="cpu",
        max_steps=3, architecture="important", modality_dropout=0.7, fitness_steps=0))
    config = load_checkpoint(result.checkpoint).meta.architecture.config
    assert config["accepts_subsets"] is True and config["inputs"] == ["t1w", "t2w"]
    with pytest.raises(InputError, match="for IMPORTANT-Net"):
        train(cohort / "manifest.csv", tmp_path / "mmgsn", TrainOptions(
            institutions=("inst2", "inst3"), epochs=1, max_steps=1, width=0.125,
            device="cpu", modality_dropout=0.5, fitness_steps=0))


def test_cyclegan_trains_unpaired_from_one_modality(cohort, tmp_path):
    import torch

    from synthesis import Synthesizer

    with pytest.raises(InputError, match="give --inputs t1w or --inputs t2w"):
        train(cohort / "manifest.csv", tmp_path / "two", TrainOptions(
            institutions=("inst2", "inst3"), architecture="cyclegan"))
    done = subprocess.run(  # the command, progress bar included
        [sys.executable, "-m", "vcemri", "train", "--manifest", str(cohort / "manifest.csv"),
         "--out", str(tmp_path / "cyclegan"), "--institutions", "inst2,inst3", "--epochs", "1",
         "--batch-size", "2", "--width", "0.125", "--device", "cpu", "--max-steps", "2",
         "--fitness-steps", "0",
         "--architecture", "cyclegan", "--inputs", "t2w", "--crop", "64x48"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "cycle=" in done.stderr
    checkpoint = load_checkpoint(tmp_path / "cyclegan" / "model.safetensors")
    assert checkpoint.meta.architecture.name == "cyclegan"
    assert checkpoint.meta.discriminator.config["conditional"] is False
    assert Synthesizer(checkpoint).inputs == ("t2w",)
    log = list(csv.DictReader(open(tmp_path / "cyclegan" / "training_log.csv")))
    assert [int(r["step"]) for r in log] == [1, 2]
    assert all(float(r["loss_cycle"]) > 0 for r in log)
    state = torch.load(tmp_path / "cyclegan" / "training_state.pt", weights_only=True)
    assert {"generator", "backward", "discriminator", "input_discriminator"} <= set(state)


def test_cyclegan_steps_never_see_the_paired_target_and_learn_to_cycle():
    import torch

    from synthesis import build_model
    from training.objectives import CycleObjective

    torch.manual_seed(0)
    generator = build_model("cyclegan", inputs=("t1w",), width_multiplier=0.125, blocks=2,
                            output="linear")
    discriminator = build_model("patchgan", conditional=False, width_multiplier=0.125)
    objective = CycleObjective(generator, discriminator, [0], cycle_weight=10.0,
                               adversarial_weight=1.0, learning_rate=2e-3, autocast=None,
                               scaling=False, world=1, device=torch.device("cpu"))
    r, c = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blobs = torch.stack([((r - 8 - k) ** 2 + (c - 20 + k) ** 2 < 40).float() for k in range(8)])
    x = torch.stack([blobs, blobs], 1)  # "T1w" and "T2w"
    paired = torch.full((8, 1, 32, 32), float("nan"))  # a CycleGAN must not look at these
    unpaired = 2.0 * blobs.flip(0)[:, None]
    cycle = [float(objective.step(x, paired, unpaired)[1]) for _ in range(30)]
    assert all(np.isfinite(cycle))
    assert np.mean(cycle[-5:]) < 0.5 * np.mean(cycle[:5])


def test_fine_tuning_starts_from_the_given_checkpoint(run, cohort, tmp_path):
    import torch

    _, result = run
    options = dict(institutions=("inst2", "inst3"), epochs=1, batch_size=4, width=0.125,
                   device="cpu", max_steps=1, learning_rate=0.0, init=str(result.checkpoint),
                   fitness_steps=0)
    tuned = train(cohort / "manifest.csv", tmp_path / "tuned", TrainOptions(**options))
    before = load_checkpoint(result.checkpoint).generator.state_dict()
    after = load_checkpoint(tuned.checkpoint).generator.state_dict()
    for name, value in before.items():
        if value.is_floating_point() and "running" not in name:
            torch.testing.assert_close(after[name], value, msg=name)  # learning rate 0
    with pytest.raises(InputError, match="differs from the one asked for"):
        train(cohort / "manifest.csv", tmp_path / "wider",
              TrainOptions(**{**options, "width": 0.25}))


def test_a_model_trained_at_a_fixed_spacing_synthesizes_at_that_spacing(cohort, tmp_path):
    """`vcemri train --spacing-mm`: the cache holds every patient at that pixel size on one
    canvas (the widest field of view, in multiples of 32, padded with the normalised
    background), the checkpoint records the policy, and the pipeline runs the network at it
    and delivers on the acquired T1w grid (issue 15, point 5)."""
    from synthesis import GridPolicy, Synthesizer, read_series
    from training.dataset import SliceCache

    result = train(cohort / "manifest.csv", tmp_path / "spaced", TrainOptions(
        institutions=("inst2", "inst3"), epochs=1, batch_size=4, width=0.125, device="cpu",
        max_steps=2, fitness_steps=20, spacing_mm=3.0))
    meta = load_checkpoint(result.checkpoint).meta
    entries = read_manifest(cohort / "manifest.csv")
    fields = []
    for entry in entries:
        if entry.institution in ("inst2", "inst3"):
            t1 = read_series(entry.paths["t1w"])
            spacing = t1.image.GetSpacing()
            fields.append((t1.array.shape[1] * spacing[1], t1.array.shape[2] * spacing[0]))
    widest = max(f[0] for f in fields), max(f[1] for f in fields)
    assert meta.model_spacing_mm == 3.0
    assert all(n % 32 == 0 and n * 3.0 >= w - 3.0 for n, w in zip(meta.model_grid, widest))
    cache = SliceCache(next((tmp_path / "spaced" / "cache").iterdir()))
    assert cache.grid == GridPolicy(*meta.model_grid, 3.0)
    assert cache.inputs.shape[-2:] == tuple(meta.model_grid)
    # a 187 mm wide inst3 field sits centred on the canvas: columns outside it hold the
    # background's normalised value, the same as the background inside the field
    inst3 = next(i for i, p in enumerate(cache.patients) if p.institution == "inst3")
    row = cache.offsets[inst3]
    t1_slice = np.asarray(cache.inputs[row, 0], np.float32)
    assert np.ptp(t1_slice[:, 0]) == 0 and np.ptp(t1_slice[:, -1]) == 0
    assert t1_slice[0, 0] == pytest.approx(float(np.median(t1_slice[:2])), abs=1e-3)

    external = next(e for e in entries if e.institution == "inst5")
    t1w = read_series(external.paths["t1w"])
    done = Synthesizer(load_checkpoint(result.checkpoint)).run(
        t1w, read_series(external.paths["t2w"]), screen=False)
    assert done.model["grid"] == f"3 mm pixels on a {meta.model_grid[0]} x " \
                                 f"{meta.model_grid[1]} canvas"
    assert done.vce.array.shape == t1w.array.shape
    assert done.vce.image.GetSpacing() == t1w.image.GetSpacing()
    assert done.model_grid.shape == (t1w.array.shape[0], 256, 224)
    assert np.isfinite(done.vce.array).all() and done.vce.array.max() > 0
    assert done.confidence is not None
    assert done.confidence.GetSize() == t1w.image.GetSize()


def test_batchnorm_recalibration_after_crops_covers_the_error_head():
    """update_bn resets every BatchNorm it is given; the confidence module's error head runs
    only in auxiliary passes, so the recalibration must make those, or the head would keep
    the defaults (mean 0, variance 1) and predict the wrong errors (the first model trained
    with it expected 3-6 times its actual error)."""
    import torch

    from synthesis import build_model
    from training.handlers import BatchNormRecalibration

    torch.manual_seed(0)
    generator = build_model("mmgsn", width_multiplier=0.125, output="linear", confidence=True)
    slices = [torch.randn(2, 2, 64, 48) * 3 + 1 for _ in range(2)]
    BatchNormRecalibration(generator, lambda: slices, torch.device("cpu")).completed(None)
    norms = {name: m for name, m in generator.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert any(name.startswith("error_head") for name in norms)
    for name, module in norms.items():
        assert int(module.num_batches_tracked) > 0, name
        assert float(module.running_var.sub(1).abs().max()) > 1e-3, name
    assert not generator.training


def test_the_quantile_loss_teaches_the_error_a_vce_exceeds_with_the_given_probability():
    """``quantile_error_loss``: a head fitted with it to a sample of errors (here |N(0, 1)|
    and a heavy tail, as a sometimes-wrong tumour gives) settles on their q-quantile, where
    the Laplace likelihood settles on their mean."""
    import torch

    from training.objectives import error_loss, quantile_error_loss

    generator = torch.Generator().manual_seed(0)
    errors = torch.randn(4000, generator=generator).abs()
    errors[:400] *= 8.0  # one pixel in ten far off
    target, vce = errors.reshape(1, 1, 40, 100), torch.zeros(1, 1, 40, 100)
    for quantile in (0.5, 0.9):
        log_b = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.Adam([log_b], lr=0.05)
        for _ in range(600):
            optimizer.zero_grad()
            quantile_error_loss(vce, log_b.expand_as(vce), target, quantile).backward()
            optimizer.step()
        expected = float(torch.quantile(errors, quantile))
        assert float(log_b.detach().exp()) == pytest.approx(expected, rel=0.05), quantile
    log_b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([log_b], lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        error_loss(vce, log_b.expand_as(vce), target).backward()
        optimizer.step()
    assert float(log_b.detach().exp()) == pytest.approx(float(errors.mean()), rel=0.05)


def test_refit_confidence_changes_the_error_head_alone_and_records_how(run, cohort, tmp_path,
                                                                        capsys):
    """``vcemri refit-confidence``: the error head learns on augmented training slices; the
    VCE, the screening and the fitness classifier stay bit for bit those of the input model."""
    import torch
    from support.models import make_checkpoint

    from vcemri.cli import main

    out, result = run
    assert main(["refit-confidence", "--model", str(result.checkpoint), "--manifest",
                 str(cohort / "manifest.csv"), "--out", str(tmp_path / "refit"), "--steps", "12",
                 "--device", "cpu", "--quiet"]) == 0
    assert "12 steps on" in capsys.readouterr().out
    before = load_checkpoint(result.checkpoint)
    after = load_checkpoint(tmp_path / "refit" / "model.safetensors")
    a, b = before.generator.state_dict(), after.generator.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("error_head.") and "running" not in k for k in changed)
    for old, new in ((before.discriminator, after.discriminator),
                     (before.fitness, after.fitness)):
        assert all(torch.equal(x, y) for x, y in zip(old.state_dict().values(),
                                                     new.state_dict().values(), strict=True))
    assert after.meta.ood == before.meta.ood and after.meta.fitness == before.meta.fitness
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        plain, refitted = before.generator(x, aux=True), after.generator(x, aux=True)
    assert torch.equal(plain[0], refitted[0]) and not torch.equal(plain[3], refitted[3])
    record = after.meta.confidence.refit
    training = json.loads((out / "split.json").read_text())["train"]
    assert record["steps"] == 12 and record["patients"] == len(training)
    # its split beside it, as the trainer's: evaluate keeps the training patients out
    assert (json.loads((tmp_path / "refit" / "split.json").read_text())
            == json.loads((out / "split.json").read_text()))
    assert record["source_weights_sha256"] == before.weights_sha256
    assert record["command"].startswith("vcemri refit-confidence --model")
    # by default the head learns the error exceeded with probability 0.3, recorded
    assert after.meta.confidence.error_quantile == record["quantile"] == 0.7
    # --quantile mean: the expected error, the likelihood the head was trained with
    assert main(["refit-confidence", "--model", str(result.checkpoint), "--manifest",
                 str(cohort / "manifest.csv"), "--out", str(tmp_path / "mean"), "--steps", "12",
                 "--quantile", "mean", "--device", "cpu", "--quiet"]) == 0
    expected = load_checkpoint(tmp_path / "mean" / "model.safetensors")
    assert expected.meta.confidence.error_quantile is None
    assert expected.meta.confidence.refit["quantile"] is None
    with torch.no_grad():
        mean = expected.generator(x, aux=True)
    assert torch.equal(mean[0], plain[0]) and not torch.equal(mean[3], refitted[3])
    # --patients unseen: the generator's real errors at the sites it was not trained on
    split = json.loads((out / "split.json").read_text())
    assert main(["refit-confidence", "--model", str(result.checkpoint), "--manifest",
                 str(cohort / "manifest.csv"), "--out", str(tmp_path / "unseen"), "--steps",
                 "6", "--patients", "unseen", "--device", "cpu", "--quiet"]) == 0
    assert f"6 steps on {len(split['external'])} unseen-site patients" in capsys.readouterr().out
    unseen = load_checkpoint(tmp_path / "unseen" / "model.safetensors")
    assert unseen.meta.confidence.refit["patients_from"] == "unseen"
    assert json.loads((tmp_path / "unseen" / "split.json").read_text()) == split
    with torch.no_grad():
        assert torch.equal(unseen.generator(x, aux=True)[0], plain[0])
    # ... and refused, with what to do, where every site is one it was trained on
    rows = (cohort / "manifest.csv").read_text().splitlines()

    def manifest(name: str, patients: set[str]) -> Path:
        (tmp_path / name).write_text("\n".join(
            [rows[0]] + [f"{p},{site},{role},{cohort / path}"
                         for p, site, role, path in (r.split(",") for r in rows[1:])
                         if p in patients]) + "\n")
        return tmp_path / name

    # a copied checkpoint refitted on a manifest without its training sites has no split to
    # keep: said, with what to do
    (tmp_path / "copied").mkdir()
    shutil.copy(result.checkpoint, tmp_path / "copied" / "model.safetensors")
    assert main(["refit-confidence", "--model", str(tmp_path / "copied" / "model.safetensors"),
                 "--manifest", str(manifest("external.csv", set(split["external"]))),
                 "--out", str(tmp_path / "lost"), "--steps", "2", "--patients", "unseen",
                 "--device", "cpu", "--quiet"]) == 0
    assert "copy the input model's split.json" in capsys.readouterr().err
    assert not (tmp_path / "lost" / "split.json").exists()
    known = set(split["train"])
    manifest("trained.csv", known)
    assert main(["refit-confidence", "--model", str(result.checkpoint), "--manifest",
                 str(tmp_path / "trained.csv"), "--out", str(tmp_path / "none"),
                 "--patients", "unseen", "--quiet"]) != 0
    assert "simulate a cohort of other sites" in capsys.readouterr().err
    for wrong in ("1", "0", "1.5"):
        with pytest.raises(SystemExit):
            main(["refit-confidence", "--model", str(result.checkpoint), "--manifest",
                  str(cohort / "manifest.csv"), "--out", str(tmp_path / "x"),
                  "--quantile", wrong])
    capsys.readouterr()
    # a model without a confidence module is refused with the reason
    plain_model = make_checkpoint(tmp_path / "plain.safetensors", cohort, ("inst2",))
    assert main(["refit-confidence", "--model", str(plain_model), "--manifest",
                 str(cohort / "manifest.csv"), "--out", str(tmp_path / "no"), "--quiet"]) != 0
    assert "has no confidence module" in capsys.readouterr().err


def test_recalibrate_restores_the_batchnorm_statistics_of_the_training_crops(run, cohort,
                                                                               tmp_path, capsys):
    """A crop-trained model normalises with the statistics of crop batches; `vcemri
    recalibrate` recomputes them for a checkpoint whose statistics came from elsewhere (the
    trainer once took them on whole slices): exactly what the trainer now computes, every
    weight kept, the OOD calibration and the internal L1 measured again, and recorded."""
    import torch

    from synthesis import save_checkpoint
    from training.handlers import BatchNormRecalibration
    from vcemri.cli import main

    out, result = run
    trained = load_checkpoint(result.checkpoint)
    expected = {k: v.clone() for k, v in trained.generator.state_dict().items()}
    old = load_checkpoint(result.checkpoint)
    cache_rows = json.loads((out / "split.json").read_text())["train"]
    from training.dataset import SliceCache

    cache = SliceCache(next((out / "cache").iterdir()))
    rows = cache.rows(set(cache_rows))
    whole = [torch.from_numpy(np.asarray(cache.inputs[rows[i:i + 8]], np.float32)[:, :2])
             for i in range(0, len(rows), 8)]
    BatchNormRecalibration(old.generator, lambda: whole, torch.device("cpu")).completed(None)
    shifted = old.generator.state_dict()
    assert any(not torch.equal(shifted[k], expected[k]) for k in expected if "running" in k)
    save_checkpoint(tmp_path / "whole.safetensors", old.generator, old.meta, old.discriminator,
                    old.fitness)

    assert main(["recalibrate", "--model", str(tmp_path / "whole.safetensors"), "--manifest",
                 str(cohort / "manifest.csv"), "--out", str(tmp_path / "recal"),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "internal L1 inside the head" in printed and "'VCE = T1w'" in printed
    after = load_checkpoint(tmp_path / "recal" / "model.safetensors")
    for name, value in after.generator.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)
    assert after.meta.ood.threshold == pytest.approx(trained.meta.ood.threshold, rel=1e-4)
    assert after.meta.metrics["internal_l1_normalized"] == pytest.approx(
        trained.meta.metrics["internal_l1_normalized"], abs=1e-4)
    record = after.meta.training["batchnorm_recalibration"]
    assert record["crop"] == [128, 112] and record["patients"] == len(cache_rows)
    assert record["internal_l1_normalized_before"] != record["internal_l1_normalized_after"]
    assert after.meta.fitness == trained.meta.fitness
    # a model trained on whole slices kept the statistics of what it saw: refused, with why
    whole_meta = trained.meta.model_copy(update={"training": {
        **trained.meta.training,
        "options": {**trained.meta.training["options"], "crop": None}}})
    save_checkpoint(tmp_path / "slices.safetensors", trained.generator, whole_meta,
                    trained.discriminator, trained.fitness)
    assert main(["recalibrate", "--model", str(tmp_path / "slices.safetensors"), "--manifest",
                 str(cohort / "manifest.csv"), "--out", str(tmp_path / "no")]) != 0
    assert "records no training crop" in capsys.readouterr().err


def test_recalibrate_can_give_a_model_without_one_its_fitness_classifier(run, cohort,
                                                                         tmp_path, capsys):
    """A fine-tune trained with --fitness-steps 0 has no screening network; `vcemri
    recalibrate --fitness-steps N` trains one as `vcemri train` would (the model's own
    training patients, calibrated on its internal ones), and the pipeline screens with it."""
    from synthesis import PipelineOptions, Synthesizer, read_series, save_checkpoint
    from vcemri.cli import main

    _, result = run
    trained = load_checkpoint(result.checkpoint)
    bare = trained.meta.model_copy(update={"fitness": None})
    save_checkpoint(tmp_path / "bare.safetensors", trained.generator, bare,
                    trained.discriminator, None)
    assert main(["recalibrate", "--model", str(tmp_path / "bare.safetensors"), "--manifest",
                 str(cohort / "manifest.csv"), "--out", str(tmp_path / "fit"),
                 "--device", "cpu", "--fitness-steps", "40"]) == 0
    assert "fitness classifier: 40 steps, threshold" in capsys.readouterr().out
    after = load_checkpoint(tmp_path / "fit" / "model.safetensors")
    assert after.fitness is not None and after.meta.fitness is not None
    calibration = after.meta.fitness.calibration
    split = json.loads((run[0] / "split.json").read_text())
    assert calibration["patients"] == len(split["internal"])
    assert set(calibration["detected"]) == set(after.meta.fitness.faults)
    assert np.isfinite(after.meta.fitness.threshold)
    assert json.loads((tmp_path / "fit" / "split.json").read_text()) == split
    assert after.meta.training["batchnorm_recalibration"]["fitness_steps"] == 40
    # the pipeline scores a study with it: a screening stage that was absent before
    entry = next(e for e in read_manifest(cohort / "manifest.csv")
                 if e.patient in split["internal"])
    t1, t2 = read_series(entry.paths["t1w"]), read_series(entry.paths["t2w"])
    options = PipelineOptions(device="cpu", confidence=False)
    screened = Synthesizer(after, options).run(t1, t2, enforce=False).screening
    assert screened.fitness_threshold == pytest.approx(after.meta.fitness.threshold)
    assert screened.fitness_score is not None and np.isfinite(screened.fitness_score)
    without = Synthesizer(tmp_path / "bare.safetensors", options).run(t1, t2, enforce=False)
    assert without.screening.fitness_score is None
