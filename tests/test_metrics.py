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
