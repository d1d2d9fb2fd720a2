"""NormalErrorModel and the smoothing/threshold helpers: calibration holds on fresh normal data."""

import numpy as np
import pytest

from anomaly.errors import TrainingError
from anomaly.scoring import (
    MAX_SURPRISE,
    NormalErrorModel,
    calibrate_threshold,
    score_from_surprise,
    smooth_surprise,
    surprise_from_score,
)


def correlated(n, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    return z @ np.array([[1.0, 0.8, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 2.0]]) + [0.1, -0.2, 0.0]


def test_tail_probabilities_are_calibrated_on_fresh_normal_data():
    model = NormalErrorModel.fit(correlated(20000, 0))
    p = model.tail_probability(model.distance2(correlated(20000, 1)))
    for level in (0.5, 0.1, 0.01):
        assert abs((p < level).mean() - level) < level * 0.25 + 0.002


def test_mahalanobis_sees_broken_correlation_that_marginals_miss():
    model = NormalErrorModel.fit(correlated(20000, 0))
    # both features within 2 sd of their marginals, but against their strong positive correlation
    odd = np.array([[2.0, -1.5, 0.0]])
    assert model.surprise(odd)[0] > 4


def test_contributions_sum_to_one_and_point_at_the_feature():
    model = NormalErrorModel.fit(correlated(5000, 0))
    c = model.contributions(np.array([[0.1, -0.2, 12.0]]))
    assert c.sum() == pytest.approx(1.0, abs=1e-5) and int(np.argmax(c)) == 2


def test_missing_features_contribute_nothing_and_surprise_is_bounded():
    model = NormalErrorModel.fit(correlated(5000, 0))
    assert model.surprise(np.array([[np.nan, np.nan, np.nan]]))[0] < 1
    assert model.surprise(np.array([[1e30, 0, 0]]))[0] == pytest.approx(MAX_SURPRISE)


def test_round_trip_through_dict_and_validation():
    model = NormalErrorModel.fit(correlated(1000, 0))
    again = NormalErrorModel.from_dict(model.to_dict(), 3)
    r = correlated(10, 5)
    np.testing.assert_allclose(again.surprise(r), model.surprise(r), rtol=1e-6)
    with pytest.raises(ValueError, match="centre"):
        NormalErrorModel.from_dict(model.to_dict(), 2)
    bad = model.to_dict() | {"tail_scale": -1.0}
    with pytest.raises(ValueError, match="tail_scale"):
        NormalErrorModel.from_dict(bad, 3)


def test_fit_needs_enough_finite_residuals():
    with pytest.raises(TrainingError, match="at least 50"):
        NormalErrorModel.fit(np.full((100, 2), np.nan))


def test_smoothing_threshold_and_score_mapping():
    s = np.array([[3.0, 3.0, 0.0]], dtype=np.float32)
    out = smooth_surprise(s, np.array([[True, False, True]]), np.array([1.0]), alpha=0.5)
    assert out.tolist() == [[2.0, 2.0, 1.0]]
    assert surprise_from_score(float(score_from_surprise(2.5))) == pytest.approx(2.5, rel=1e-5)
    rng = np.random.default_rng(0)
    values = rng.exponential(size=100000)
    thr = calibrate_threshold(values, 1e-3)
    assert (values > thr).mean() == pytest.approx(1e-3, rel=0.05)
    with pytest.raises(ValueError, match="false_alarm_rate"):
        calibrate_threshold(values, 0.0)
