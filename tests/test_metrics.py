"""Metrics and the divergence rule, on values with known answers."""

import math

import numpy as np

from aligner.compare.layerwise import diff_tensor, plan_groups
from aligner.compare.metrics import all_metrics, cosine, max_abs, mvre, nonfinite_counts, rel_l2, snr_db
from aligner.compare.tolerance import Tolerance, default_tolerance


def test_metrics_known_values():
    ref = np.array([1.0, -2.0, 2.0])
    test = np.array([1.0, -2.0, 2.3])
    assert math.isclose(max_abs(ref, test), 0.3)
    assert math.isclose(rel_l2(ref, test), 0.3 / 3.0)
    assert math.isclose(mvre(ref, test), (0.3 / 2.0) / 3)
    assert math.isclose(snr_db(ref, test), 10 * math.log10(9.0 / 0.09))
    assert cosine(ref, -ref) == -1.0
    assert snr_db(ref, ref) == math.inf


def test_nonfinite_counted_apart_from_metrics():
    ref = np.array([1.0, 2.0, 3.0], np.float32)
    test = np.array([1.0, np.inf, np.nan], np.float32)
    assert vars(nonfinite_counts(test)) == {"nan": 1, "posinf": 1, "neginf": 0}
    assert all_metrics(ref, test)["max_abs"] == 0.0  # only finite pairs enter the metrics
    d = diff_tensor(ref, test, default_tolerance("fp16"))
    diverges, reason = d.diverges, d.reason
    assert diverges and reason == "nonfinite"


def test_tolerance_needs_both_relative_and_absolute_error():
    tol = Tolerance("rel_l2", 1e-2, atol=1e-3)
    tiny = np.full(4, 1e-7)
    assert not diff_tensor(tiny, tiny * 2, tol).diverges  # 100% relative but negligible absolute
    assert diff_tensor(np.ones(4), np.ones(4) * 1.1, tol).diverges


def test_integer_tensors_must_match_exactly():
    assert diff_tensor(np.array([1, 2, 3]), np.array([1, 2, 4]), default_tolerance("fp16")).diverges


def test_groups_respect_budget_and_order():
    sizes = {"a": 60, "b": 60, "c": 10, "d": 200}
    assert plan_groups(["a", "b", "c", "d"], sizes, 100) == [["a"], ["b", "c"], ["d"]]


def test_metrics_of_a_large_tensor_with_nan_and_inf_in_several_blocks():
    """The block-wise pass gives the definitions' values, and counts NaN/inf wherever they fall."""
    from aligner.compare.metrics import CHUNK, measure

    rng = np.random.default_rng(0)
    ref = rng.standard_normal(3 * CHUNK + 17).astype(np.float32)
    test = ref + rng.standard_normal(ref.size).astype(np.float32) * 1e-3
    ref[[5, CHUNK + 3]] = np.nan
    test[[7, 2 * CHUNK + 1]] = np.inf
    test[3 * CHUNK + 2] = -np.inf
    metrics, nf_ref, nf_test = measure(ref, test)
    both = np.isfinite(ref) & np.isfinite(test)
    r, t = ref[both].astype(np.float64), test[both].astype(np.float64)
    for name, fn in {"max_abs": max_abs, "rel_l2": rel_l2, "mvre": mvre, "cosine": cosine, "snr_db": snr_db}.items():
        assert math.isclose(metrics[name], fn(r, t), rel_tol=1e-9), name
    assert math.isclose(metrics["mean_abs"], float(np.mean(np.abs(t - r))), rel_tol=1e-9)
    assert vars(nf_ref) == {"nan": 2, "posinf": 0, "neginf": 0}
    assert vars(nf_test) == {"nan": 0, "posinf": 2, "neginf": 1}
    assert vars(nonfinite_counts(test)) == vars(nf_test)
