"""The shipped model judged against ground truth on patients it never saw: a cohort simulated
with another seed than its training cohort, at external institutions (never in its training),
evaluated by ``vcemri evaluate``'s own code (the VCE as the node delivers it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulation import SimulationOptions, simulate_cohort
from synthesis import load_checkpoint
from synthesis.pipeline import BUILTIN_CHECKPOINT

#: Not the seed of the shipped model's training cohort (the README's command uses 2026).
UNSEEN_SEED = 7
EXTERNAL = ("inst4", "inst6")


@pytest.fixture(scope="module")
def unseen(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unseen")
    simulate_cohort(out, SimulationOptions(institutions=EXTERNAL, patients_per_institution=2,
                                           seed=UNSEEN_SEED, slices=12), workers=2)
    return out


def test_the_shipped_model_was_trained_elsewhere():
    shipped = load_checkpoint(BUILTIN_CHECKPOINT)
    assert BUILTIN_CHECKPOINT.stat().st_size < 5 * 2**20  # a few MB, committed
    assert shipped.meta.architecture.name == "mmgsn"
    assert not set(EXTERNAL) & {p.key for p in shipped.meta.institutions}


def test_every_shipped_model_is_named_committed_and_trained_elsewhere():
    """``builtin`` and ``builtin:NAME`` name the files in synthesis/weights; an unknown name
    is refused with the names there are; none was trained on the external sites."""
    import config
    from synthesis import BUILTIN_MODELS, resolve_checkpoint
    from training.trainer import model_split, training_sites

    assert set(BUILTIN_MODELS) >= {"builtin", "builtin:randomised-sites"}
    assert set(BUILTIN_MODELS) == set(config.BUILTIN_MODEL_NAMES)  # what config check knows
    for name, path in BUILTIN_MODELS.items():
        assert resolve_checkpoint(name) == path
        assert path.stat().st_size < 5 * 2**20
        assert not set(EXTERNAL) & training_sites(load_checkpoint(path))
    candidate = load_checkpoint(BUILTIN_MODELS["builtin:randomised-sites"])
    assert {"random1", "random2", "random3", "random4"} <= training_sites(candidate)
    # its split ships beside it: a fixed-sites manifest lacks its randomised groups
    split, why = model_split("builtin:randomised-sites", candidate,
                             [("SIM-INST1-001", "inst1"), ("SIM-INST4-001", "inst4")])
    assert why is None and "SIM-INST1-001" in split["train"]
    assert "SIM-INST4-001" in split["external"] and "SIM-INST4-001" not in split["train"]
    with pytest.raises(config.ModelError, match="builtin:randomised-sites"):
        resolve_checkpoint("builtin:nonsense")
    settings = config.Settings(models={"default": {"second_opinion": "builtin:randomised-sites"}})
    assert settings.models["default"].second_opinion == "builtin:randomised-sites"
    with pytest.raises(ValueError, match="no built-in model 'builtin:randomised-site'.*"
                       "builtin:randomised-sites"):  # a misspelt name, caught by config check
        config.Settings(models={"default": {"checkpoint": "builtin:randomised-site"}})


@pytest.fixture(scope="module")
def evaluation(unseen):
    from training.evaluate import evaluate

    return evaluate({"model": BUILTIN_CHECKPOINT}, unseen / "manifest.csv", device="cpu")


def test_the_shipped_model_beats_copying_the_t1w_in_the_tumour_on_unseen_patients(evaluation):
    rows = {(r["patient"], r["method"]): r for r in evaluation.rows}
    patients = sorted({p for p, _ in rows})
    assert len(patients) == 2 * len(EXTERNAL)
    for key in ("acquired_seed000_tumour_mae", "seed000_tumour_mae"):
        model = np.array([rows[(p, "model")][key] for p in patients], float)
        copy = np.array([rows[(p, "VCE = T1w")][key] for p in patients], float)
        assert (model < copy).all(), (key, model, copy)
        assert model.mean() < 0.8 * copy.mean(), (key, model.mean(), copy.mean())


def test_the_low_confidence_helper_covers_the_tumours_the_shipped_model_gets_wrong(evaluation):
    """Seed 002's confidence as refitted (vcemri refit-confidence): where the synthetic
    tumour's excess contrast is off by more than 30 % (the model under-enhances at unseen
    sites), the low-confidence helper covers at least half of the tumour, and it does so
    without flagging the head wholesale (measured on these patients with the head refitted
    to the 0.7 quantile of the error: the tumours 82-86 % covered with 1.3-4.0 % of the head
    flagged; refitted to the expected error 68-75 % and 0.8-2.8 %; before any refit 4-34 %
    covered, so this test failed). The per-pixel correlation is reported by ``vcemri
    evaluate`` (README), not asserted: on these 12-slice patients it is 0.24-0.39."""
    model = [r for r in evaluation.rows if r["method"] == "model"]
    wrong = [r for r in model if r["tumour_excess_error"] > 0.3]
    assert wrong  # the shipped model does under-enhance here (see the README)
    for row in wrong:
        assert row["tumour_low_confidence_share"] >= 0.5, (row["patient"], row)
    assert all(r["low_confidence_head_share"] < 0.05 for r in model)


@pytest.fixture(scope="module")
def shipped():
    from synthesis import PipelineOptions, Synthesizer

    return Synthesizer(BUILTIN_CHECKPOINT, PipelineOptions(device="cpu"))


def _pair(cohort: Path, site: str, index: int = 1):
    from synthesis import read_series

    folder = cohort / site / f"{site}-{index:03d}"
    return read_series(folder / "t1w"), read_series(folder / "t2w")


def test_the_shipped_model_accepts_unseen_patients_of_unseen_sites(unseen, shipped):
    for site in EXTERNAL:
        for index in (1, 2):
            screening = shipped.run(*_pair(unseen, site, index), enforce=False).screening
            assert screening.accepted, (site, index, screening.reasons)


def test_keeping_the_t1w_detail_makes_the_delivered_vce_beat_copying_the_t1w(unseen, shipped):
    """A 320-matrix external site (inst6): the VCE taken back from the 256 x 224 model grid
    loses edge detail, so as delivered its head SSIM is below the copied T1w's; with
    ``keep_t1w_detail`` the detail the round trip removes is added back and head SSIM and
    MAE beat the copied T1w while the tumour's enhancement stays as it was."""
    import SimpleITK as sitk

    from synthesis import PipelineOptions, Synthesizer, read_volume, resample_onto
    from training.dataset import tumour_mask
    from training.metrics import study_metrics
    from training.reliability import excess_contrast

    sharp = Synthesizer(BUILTIN_CHECKPOINT, PipelineOptions(device="cpu", keep_t1w_detail=True))
    folder = unseen / "inst6" / "inst6-001"
    t1w, t2w = _pair(unseen, "inst6")
    ce = resample_onto(read_volume(folder / "ce"), t1w)
    plain, detailed = shipped.run(t1w, t2w, enforce=False), sharp.run(t1w, t2w, enforce=False)
    head = sitk.GetArrayFromImage(plain.foreground) > 0
    tumour = tumour_mask(folder / "tumour.nii.gz", t1w.image)
    truth = np.where(head, ce.array, 0.0)
    scores = {name: study_metrics(truth, np.where(head, image, 0.0), tumour, head)
              for name, image in (("plain", plain.vce.array), ("detail", detailed.vce.array),
                                  ("copy", t1w.array))}
    assert scores["plain"]["seed000_head_ssim"] < scores["copy"]["seed000_head_ssim"]
    assert scores["detail"]["seed000_head_ssim"] > scores["copy"]["seed000_head_ssim"]
    assert scores["detail"]["seed000_head_mae"] < scores["plain"]["seed000_head_mae"] < \
        scores["copy"]["seed000_head_mae"]
    assert scores["detail"]["seed000_tumour_mae"] < 0.8 * scores["copy"]["seed000_tumour_mae"]
    assert excess_contrast(detailed.vce.array, tumour, head) == pytest.approx(
        excess_contrast(plain.vce.array, tumour, head), abs=0.02)
    # other pixels under other UIDs: the TPS never gets both under one SOP Instance UID
    from planning.identity import result_key

    assert detailed.model["keep_t1w_detail"] and result_key(detailed) != result_key(plain)


@pytest.mark.parametrize("fault", [
    ("swapped labels", "T2w pixels as T1w and the reverse, headers kept"),
    ("T2w copies the T1w", "identical pixels"),
    ("noise", "T2w of Rician noise"),
    ("misregistration beyond the bound", "20 mm"),
])
def test_the_shipped_model_refuses_an_unfit_pair(unseen, shipped, fault):
    """Each fault benchmarks/screening.py measures, made from an unseen patient, is refused
    with a reason (the benchmark gives the rates over many patients and sites)."""
    from benchmarks.screening import TRANSFORMS
    from synthesis import RejectedStudy

    faulty = TRANSFORMS[fault](_pair(unseen, "inst6"), np.random.default_rng(0))
    with pytest.raises(RejectedStudy) as refused:
        shipped.run(*faulty)
    assert refused.value.screening.reasons


def test_the_shipped_model_refuses_a_swapped_pair_with_a_stir_t2w(tmp_path, shipped):
    """With a STIR T2w a swap reads like a real pair to the check without a model (both
    series darken the other's brightest voxels; synthesis/checks.py), so the fitness
    classifier or the OOD score must refuse it: an unseen patient of inst7 (STIR), swapped."""
    from benchmarks.screening import TRANSFORMS
    from simulation import simulate_patient
    from synthesis import RejectedStudy, read_series

    record = simulate_patient(tmp_path, "inst7", 1, SimulationOptions(
        institutions=("inst7",), seed=UNSEEN_SEED, slices=12))
    pair = (read_series(tmp_path / record.paths["t1w"]),
            read_series(tmp_path / record.paths["t2w"]))
    assert shipped.run(*pair, enforce=False).screening.accepted  # the real pair passes
    swapped = TRANSFORMS[("swapped labels", "T2w pixels as T1w and the reverse, headers kept")]
    with pytest.raises(RejectedStudy) as refused:
        shipped.run(*swapped(pair, np.random.default_rng(0)))
    reasons = refused.value.screening.reasons
    assert not any("look swapped" in r for r in reasons), reasons
    assert any("fitness classifier" in r or "out-of-distribution" in r for r in reasons), reasons


def test_the_shipped_model_refuses_a_pelvis_labelled_head_and_neck(tmp_path, shipped):
    from benchmarks.screening import SIMULATED
    from simulation import simulate_patient
    from synthesis import RejectedStudy, read_series

    keywords = SIMULATED[("wrong body part", "a pelvis labelled head and neck")]("inst4")
    record = simulate_patient(tmp_path, "inst4", 1, SimulationOptions(
        institutions=("inst4",), seed=UNSEEN_SEED, slices=12), **keywords)
    pelvis = (read_series(tmp_path / record.paths["t1w"]),
              read_series(tmp_path / record.paths["t2w"]))
    assert pelvis[0].info.body_part == "HEADNECK"  # the header claims head and neck
    with pytest.raises(RejectedStudy, match="not a head-and-neck study"):
        shipped.run(*pelvis)
