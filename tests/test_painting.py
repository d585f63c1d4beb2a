"""Seed 002's CG-SAMR as an augmentation source: the generator, seed 004's lesion levels and
their edits, training a painter with ``vcemri train --architecture cgsamr``, and a VCE model
trained with ``--paint``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import synthesis
from config import InputError
from simulation import SimulationOptions, simulate_cohort
from synthesis.model_inputs import BUILTIN_CHECKPOINT
from training import lesion_maps
from training.dataset import SliceCache, read_manifest
from training.painting import Painter, load_painter


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    y, x = np.ogrid[:shape[0], :shape[1]]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius ** 2


def test_cgsamr_synthesises_each_sequence_with_a_half_resolution_confidence():
    model = synthesis.build_model("cgsamr", width_multiplier=0.125)
    images, intermediate, confidence = model(torch.randn(2, model.in_channels, 48, 64))
    assert images.shape == (2, 3, 48, 64)
    assert intermediate.shape == confidence.shape == (2, 3, 24, 32)
    assert 0.0 < float(confidence.detach().min()) and float(confidence.detach().max()) < 1.0
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(1, model.in_channels, 50, 64))
    assert "cgsamr" in synthesis.PAINTERS and "cgsamr" not in synthesis.GENERATORS


def test_a_lesions_levels_follow_its_enhancement_and_each_edit_does_what_it_says():
    shape = (96, 96)
    lesion = _disc(shape, (48, 48), 10)
    depth = np.hypot(*np.ogrid[-48:48, -48:48])
    ce = np.where(lesion, 3.0 - depth / 10.0, 0.0) + np.random.default_rng(0).normal(
        0, 0.01, shape)  # brightest at the centre
    labels = lesion_maps.quantise(ce, lesion)
    assert set(np.unique(labels[lesion])) == {1, 2, 3} and not labels[~lesion].any()
    means = [ce[labels == k].mean() for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]

    head = _disc(shape, (48, 48), 45)
    rng = np.random.default_rng(1)
    area = int(lesion.sum())
    moved = lesion_maps.edit_lesion(labels, head, rng, "moved")
    assert (moved.labels > 0).sum() == area
    assert not np.array_equal(moved.labels, labels)
    grown = lesion_maps.edit_lesion(labels, head, rng, "grown")
    shrunk = lesion_maps.edit_lesion(labels, head, rng, "shrunk")
    assert (grown.labels > 0).sum() > 1.3 * area and (shrunk.labels > 0).sum() < 0.8 * area
    necrotic = lesion_maps.edit_lesion(labels, head, rng, "necrotic")
    core = necrotic.labels == 1
    assert core.any() and not core[~lesion_maps.dilate(core, 1) | ~lesion].any()
    assert necrotic.labels[48, 48] == 1 and necrotic.labels[48, 39] == 3  # rim enhances
    for edited in (moved, grown, shrunk, necrotic):
        assert head[edited.labels > 0].all()
        # the region holds the old lesion (to be replaced by tissue) and the new one
        assert edited.region[lesion].all() and edited.region[edited.labels > 0].all()
    # no lesion, or no room in the head for it: nothing is painted
    assert lesion_maps.edit_lesion(np.zeros(shape, np.int8), head, rng) is None
    assert lesion_maps.edit_lesion(labels, lesion, rng, "grown") is None


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("painting")
    simulate_cohort(out, SimulationOptions(
        institutions=("inst2",), patients_per_institution=3, matrix_scale=0.25, slices=6,
        lesions=2), workers=2)
    return out


@pytest.fixture(scope="module")
def painter(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("painter")
    done = subprocess.run(
        [sys.executable, "-m", "vcemri", "train", "--architecture", "cgsamr", "--manifest",
         str(cohort / "manifest.csv"), "--out", str(out), "--max-steps", "4",
         "--batch-size", "2", "--width", "0.125", "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "painter:" in done.stdout
    return out / "painter.safetensors"


def test_vcemri_train_cgsamr_writes_a_painter_that_records_how_it_was_trained(painter):
    generator, meta = load_painter(painter)
    assert meta["architecture"] == "cgsamr" and meta["config"]["width_multiplier"] == 0.125
    assert meta["training"]["steps"] == 4 and meta["training"]["lesion_slices"] > 0
    assert meta["normalization"] == {"method": "zscore", "level": "patient"}
    refused = subprocess.run(
        [sys.executable, "-m", "vcemri", "train", "--architecture", "cgsamr", "--manifest",
         str(painter.parent / "none.csv"), "--out", str(painter.parent / "again"), "--resume",
         "--crop", "64x64"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--resume, --crop do(es) not apply" in refused.stderr
    log = (painter.parent / "painter_log.csv").read_text().splitlines()
    assert log[0].startswith("step,l1,gan,fm,sc,cm,d") and len(log) == 5
    split = json.loads((painter.parent / "split.json").read_text())
    assert split["internal"] and not set(split["internal"]) & set(split["train"])


def test_a_vce_checkpoint_is_not_taken_for_a_painter(tmp_path):
    with pytest.raises(InputError, match="not a CG-SAMR painter"):
        load_painter(BUILTIN_CHECKPOINT)
    (tmp_path / "x.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a safetensors checkpoint"):
        load_painter(tmp_path / "x.safetensors")


def test_painting_changes_only_the_edited_region_and_repeats_with_the_same_draws(
        cohort, painter):
    cache_folder = next((painter.parent / "cache").iterdir())
    cache = SliceCache(cache_folder)
    paint = Painter(painter, probability=1.0, seed=3)
    rows = cache.rows({p.patient for p in cache.patients})
    assert paint.prepare(cache, read_manifest(cohort / "manifest.csv"), rows) > 0
    row = sorted(paint.labels, key=lambda r: -(paint.labels[r] > 0).sum())[0]
    inputs = np.asarray(cache.inputs[row], np.float32)
    target = np.asarray(cache.targets[row], np.float32)
    for edit in lesion_maps.EDITS:
        rng = np.random.default_rng(5)
        done = paint.paint(inputs, target, paint.labels[row], rng, edit)
        assert done is not None and done.edit == edit
        again = paint.paint(inputs, target, paint.labels[row], np.random.default_rng(5), edit)
        assert np.array_equal(done.inputs, again.inputs)
        changed = (np.abs(done.inputs - inputs).max(0) > 0) | (np.abs(done.target - target) > 0)
        assert changed[done.region].any()
        # beyond the blending's reach every pixel is as acquired
        assert not changed[~lesion_maps.dilate(done.region, lesion_maps.BLEND_REACH_PX)].any()
    # a batch repaints reproducibly: the same rows and epoch give the same pixels
    batch_rows = np.array(sorted(paint.labels)[:2])
    x = np.asarray(cache.inputs[batch_rows], np.float32)
    y = np.asarray(cache.targets[batch_rows], np.float32)
    first = paint.batch(batch_rows, x, y, epoch=2)
    second = paint.batch(batch_rows, x, y, epoch=2)
    assert first[2] > 0 and np.array_equal(first[0], second[0])
    assert np.array_equal(x, np.asarray(cache.inputs[batch_rows], np.float32))  # not in place


def test_a_vce_model_trains_with_painted_lesions_and_records_its_painter(
        cohort, painter, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "vcemri", "train", "--manifest", str(cohort / "manifest.csv"),
         "--out", str(tmp_path / "run"), "--max-steps", "2", "--width", "0.125",
         "--fitness-steps", "0", "--crop", "64x64", "--paint", str(painter),
         "--paint-probability", "1", "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    meta = synthesis.load_checkpoint(tmp_path / "run" / "model.safetensors").meta
    recorded = meta.training["painter"]
    assert recorded["path"] == str(painter) and recorded["probability"] == 1.0
    assert recorded["lesion_slices"] > 0 and recorded["steps"] == 4
    assert meta.training["options"]["paint"] == str(painter)
    # a painter is refused where a VCE model is meant, with the reason
    refused = subprocess.run(
        [sys.executable, "-m", "vcemri", "train", "--manifest", str(cohort / "manifest.csv"),
         "--out", str(tmp_path / "bad"), "--max-steps", "1", "--paint",
         str(tmp_path / "run" / "model.safetensors"), "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "not a CG-SAMR painter" in refused.stderr
    assert "Traceback" not in refused.stderr
