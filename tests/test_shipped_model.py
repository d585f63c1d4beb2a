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


def test_the_shipped_model_beats_copying_the_t1w_in_the_tumour_on_unseen_patients(unseen):
    from training.evaluate import evaluate

    evaluation = evaluate({"model": BUILTIN_CHECKPOINT}, unseen / "manifest.csv", device="cpu")
    rows = {(r["patient"], r["method"]): r for r in evaluation.rows}
    patients = sorted({p for p, _ in rows})
    assert len(patients) == 2 * len(EXTERNAL)
    for key in ("acquired_seed000_tumour_mae", "seed000_tumour_mae"):
        model = np.array([rows[(p, "model")][key] for p in patients], float)
        copy = np.array([rows[(p, "VCE = T1w")][key] for p in patients], float)
        assert (model < copy).all(), (key, model, copy)
        assert model.mean() < 0.8 * copy.mean(), (key, model.mean(), copy.mean())
