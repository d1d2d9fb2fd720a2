"""NAB scoring (anomaly/evaluation/scorers.py) against hand-computed cases, an independent brute-force
oracle and the real NAB corpus; SKAB's pooled F1/FAR/MAR on a worked example.

Hand values use the identity ``scaledSigmoid(x) = 2 * sigmoid(-5x) - 1 = tanh(-5x / 2)``, so they do
not reuse the module's formula. Layout of the main fixture: one file of 100 rows (probationary
period = floor(0.15 * 100) = 15 rows) with one window over rows 50..59 (width 10).
"""

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly.errors import DataError
from anomaly.evaluation.scorers import (
    MAX_TP,
    NAB_PROFILES,
    CostMatrix,
    EventCounts,
    NabCorpus,
    nab_score_corpus,
    predicted_sequences,
    probation_length,
    read_nab_profiles,
    scaled_sigmoid,
    skab_binary_metrics,
    telemanom_event_counts,
)

# the benchmark data sits beside the checkout (../shared/data), in CI too
DATA = Path(os.environ.get("SENSOR_ANOMALY_DATA", Path(__file__).resolve().parents[4].parent / "shared" / "data"))
STD = NAB_PROFILES["standard"]
TS = pd.date_range("2024-01-01", periods=100, freq="5min")
WINDOW = {"a.csv": [(TS[50], TS[59])]}


def tanh_sig(x):
    """NAB's scaled sigmoid, written as tanh."""
    return -1.0 if x > 3.0 else math.tanh(-2.5 * x)


def detections(*rows, n=100):
    scores = np.zeros(n)
    scores[list(rows)] = 1.0
    return scores


def score_one(scores, windows=None, profiles=None, probation_percent=0.15):
    frame = pd.DataFrame({"timestamp": TS[: len(scores)], "anomaly_score": scores})
    return nab_score_corpus({"a.csv": frame}, windows or WINDOW, profiles,
                            probation_percent=probation_percent)


def raw_at(report, threshold=1.0, profile="standard"):
    return report.score_at_threshold(threshold)[profile].score


# ------------------------------------------------------------------------------- NAB primitives


def test_scaled_sigmoid_matches_nab_reference_points():
    # NAB's docstring: -1 -> 0.98661, -0.5 -> 0.84828, 0 -> 0, 1 -> -0.98661; > 3 -> exactly -1.
    values = scaled_sigmoid(np.array([-1.0, -0.5, 0.0, 1.0, 3.0, 3.0001]))
    expected = [tanh_sig(x) for x in (-1.0, -0.5, 0.0, 1.0, 3.0)] + [-1.0]
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-15)
    assert abs(MAX_TP - 0.98661429815) < 1e-11  # 2 * sigmoid(5) - 1


def test_probationary_length_is_fifteen_percent_capped_at_750_rows():
    assert probation_length(100) == 15
    assert probation_length(4032) == 604  # floor(604.8)
    assert probation_length(22695) == 750
    assert probation_length(10, 0.0) == 0


def test_profiles_constant_matches_nab_profiles_json():
    path = DATA / "nab" / "config" / "profiles.json"
    if not path.is_file():
        pytest.skip(f"NAB profiles not found at {path}")
    assert read_nab_profiles(path) == NAB_PROFILES


# ------------------------------------------------------------------------------ hand-computed


def test_perfect_detector_scores_100_and_null_detector_0_for_every_profile():
    perfect = score_one(detections(50))
    null = score_one(np.zeros(100))
    for name, cm in NAB_PROFILES.items():
        assert perfect.profiles[name].normalized == pytest.approx(100.0, abs=1e-12)
        assert perfect.profiles[name].score == pytest.approx(cm.tp_weight, abs=1e-15)
        assert perfect.profiles[name].null_score == -cm.fn_weight
        assert perfect.profiles[name].perfect_score == cm.tp_weight
        assert null.profiles[name].normalized == 0.0
        assert null.profiles[name].score == -cm.fn_weight


def test_single_early_detection_in_window_earns_scaled_tp():
    # Row 52: position -(59 - 52 + 1) / 10 = -0.8.
    a_tp = tanh_sig(-0.8) / tanh_sig(-1.0)
    assert a_tp == pytest.approx(0.9771068, abs=1e-7)
    report = score_one(detections(52))
    assert raw_at(report) == pytest.approx(a_tp, abs=1e-14)
    low_fn = CostMatrix(tp_weight=2.0, fp_weight=0.11, fn_weight=2.0)
    assert raw_at(score_one(detections(52), profiles={"x": low_fn}), profile="x") == pytest.approx(
        2.0 * a_tp, abs=1e-14)


def test_only_the_first_detection_in_a_window_counts():
    report = score_one(detections(50, 51, 55, 59))
    result = report.score_at_threshold(1.0)["standard"]
    assert result.score == pytest.approx(1.0, abs=1e-15)
    assert (result.tp, result.fp, result.fn) == (4, 0, 6)  # NAB counts rows, not windows


def test_missed_window_costs_fn_weight():
    assert raw_at(score_one(np.zeros(100)), threshold=0.5) == -1.0
    two = {"a.csv": [(TS[30], TS[39]), (TS[50], TS[59])]}
    report = score_one(detections(50), windows=two)
    assert raw_at(report, profile="reward_low_FN_rate") == pytest.approx(1.0 - 2.0, abs=1e-15)


def test_false_positive_far_from_any_window_costs_fp_weight():
    # Row 20 is before the first window: -fpWeight. Row 95 is |59 - 95| / 9 = 4 widths after it: -fpWeight.
    for row in (20, 95):
        report = score_one(detections(50, row))
        for name, cm in NAB_PROFILES.items():
            assert raw_at(report, profile=name) == pytest.approx(cm.tp_weight - cm.fp_weight, abs=1e-15)


def test_false_positive_just_after_a_window_is_weighted_by_the_sigmoid_of_its_distance():
    # Row 62: |59 - 62| / (10 - 1) = 1/3 -> fpWeight * tanh(-5/6) (about -0.075 for standard).
    report = score_one(detections(50, 62))
    expected = 1.0 + STD.fp_weight * tanh_sig(1.0 / 3.0)
    assert raw_at(report) == pytest.approx(expected, abs=1e-15)
    assert -STD.fp_weight < expected - 1.0 < 0


def test_probationary_period_ignores_detections_and_windows_inside_it():
    report = score_one(detections(10, 14, 50))  # rows 10 and 14 lie in the first 15 rows
    result = report.score_at_threshold(1.0)["standard"]
    assert result.score == pytest.approx(1.0, abs=1e-15)
    assert result.fp == 0 and result.total == 85
    # Row 15 is the first scored row.
    assert raw_at(score_one(detections(15, 50))) == pytest.approx(1.0 - STD.fp_weight, abs=1e-15)
    # A window wholly inside the probation is never missed, but NAB still counts it as achievable.
    early = {"a.csv": [(TS[5], TS[12]), (TS[50], TS[59])]}
    report = score_one(detections(50), windows=early)
    r = report.profiles["standard"]
    assert (r.score, r.null_score, r.perfect_score) == (pytest.approx(1.0, abs=1e-15), -1.0, 2.0)
    assert r.normalized == pytest.approx(100 * 2 / 3)


def test_threshold_optimisation_picks_the_best_threshold_over_the_corpus():
    # File a: window rows 50..59; detections 50 @0.9 (TP, worth 1), 20 @0.8 (FP before window),
    #         51 @0.65 (second TP, worth nothing), 30 @0.6 (FP).
    # File b: window rows 40..49; 45 @0.7 (TP at -0.5 -> tanh(1.25)/tanh(2.5)), 70 @0.5 (FP, 21/9 widths).
    a = np.zeros(100)
    a[[50, 20, 51, 30]] = [0.9, 0.8, 0.65, 0.6]
    b = np.zeros(100)
    b[[45, 70]] = [0.7, 0.5]
    results = {name: pd.DataFrame({"timestamp": TS, "anomaly_score": s}) for name, s in (("a", a), ("b", b))}
    windows = {"a": [(TS[50], TS[59])], "b": [(TS[40], TS[49])]}
    report = nab_score_corpus(results, windows)

    tp_b = tanh_sig(-0.5) / tanh_sig(-1.0)
    fp = STD.fp_weight
    expected = [
        (1.1, -2.0),
        (0.9, 1.0 - 1.0),
        (0.8, 1.0 - 1.0 - fp),
        (0.7, 1.0 + tp_b - fp),
        (0.65, 1.0 + tp_b - fp),  # a second detection in a window changes nothing
        (0.6, 1.0 + tp_b - 2 * fp),
        (0.5, 1.0 + tp_b - 2 * fp + fp * tanh_sig(21 / 9)),
    ]
    sweep = report.sweep("standard")
    assert sweep["threshold"].tolist()[:7] == [t for t, _ in expected]
    np.testing.assert_allclose(sweep["score"].to_numpy()[:7], [s for _, s in expected], rtol=0, atol=1e-12)
    assert sweep["threshold"].iat[7] == 0.0 and sweep["score"].iat[7] < -10  # everything detected

    best = report.profiles["standard"]
    assert best.threshold == 0.7  # ties with 0.65: NAB keeps the first, i.e. the higher threshold
    assert best.score == pytest.approx(1.0 + tp_b - fp, abs=1e-12)
    assert best.normalized == pytest.approx(100 * (best.score + 2.0) / (2.0 + 2.0), abs=1e-12)
    assert (best.tp, best.fp) == (2, 1)
    assert report.thresholds()["standard"] == {"threshold": 0.7, "score": best.score}
    assert report.per_file("standard")["score"].sum() == pytest.approx(best.score, abs=1e-12)
    # Fixed thresholds score ">= threshold", between listed values too.
    fixed = report.score_at_threshold({"standard": 0.75, "reward_low_FP_rate": 0.9, "reward_low_FN_rate": 2})
    assert fixed["standard"].score == pytest.approx(-fp, abs=1e-12)
    assert fixed["reward_low_FP_rate"].score == pytest.approx(0.0, abs=1e-12)
    assert fixed["reward_low_FN_rate"].score == -4.0


def test_windows_sharing_a_start_timestamp_share_one_score_like_nab():
    # NAB names windows "<file>|<start>": with a repeated timestamp two windows can collide.
    ts = np.array([0, 1, 2, 3, 1, 5, 6, 7, 8, 9])
    windows = {"f": [(1, 2), (1, 6)]}
    scores = np.zeros(10)
    scores[5] = 1.0  # detects the second window only
    report = nab_score_corpus({"f": pd.DataFrame({"timestamp": ts, "anomaly_score": scores})}, windows,
                              probation_percent=0.0)
    r = report.score_at_threshold(1.0)["standard"]
    # Window 2's width is measured from the FIRST row with its start timestamp (row 1): 6 - 1 + 1.
    assert r.score == pytest.approx(tanh_sig(-(6 - 5 + 1) / 6) / MAX_TP, abs=1e-15)  # no FN for window 1
    assert r.perfect_score == 2.0


# --------------------------------------------------------------------- brute-force oracle


def oracle_score(ts_count, scores, window_rows, threshold, cm, probation_percent):
    """Score one file from the written rules with plain loops (unique, increasing timestamps)."""
    probation = min(math.floor(probation_percent * ts_count), probation_percent * 5000)
    total = 0.0
    for lo, hi in window_rows:
        width = hi - lo + 1
        rows = [i for i in range(lo, hi + 1) if i >= probation]
        if not rows:
            continue
        hits = [i for i in rows if scores[i] >= threshold]
        total += cm.tp_weight * tanh_sig(-(hi - hits[0] + 1) / width) / MAX_TP if hits else -cm.fn_weight
    for i in range(ts_count):
        if i < probation or scores[i] < threshold or any(lo <= i <= hi for lo, hi in window_rows):
            continue
        before = [(lo, hi) for lo, hi in window_rows if hi < i]
        if not before:
            total -= cm.fp_weight
        else:
            lo, hi = before[-1]
            total += cm.fp_weight * tanh_sig((i - hi) / (hi - lo))
    return total


def test_sweep_matches_a_brute_force_oracle_on_random_corpora():
    rng = np.random.default_rng(1234)
    profiles = {"standard": STD, "odd": CostMatrix(tp_weight=1.5, fp_weight=0.4, fn_weight=0.7)}
    for _ in range(40):
        results, windows, truth = {}, {}, {}
        for f in range(int(rng.integers(1, 4))):
            n = int(rng.integers(10, 80))
            cuts, rows, pos = [], [], 0
            while pos < n - 2 and rng.random() < 0.7:
                lo = int(rng.integers(pos, n - 2))
                hi = min(n - 1, lo + int(rng.integers(1, 10)))
                rows.append((lo, hi))
                pos = hi + 1 + int(rng.integers(0, 5))
            ts = np.arange(n) * 60 + 1_000
            cuts = [(int(ts[lo]), int(ts[hi])) for lo, hi in rows]
            scores = np.round(rng.random(n) * rng.choice([3, 10, 1000])) / 1000
            results[f"f{f}"] = pd.DataFrame({"timestamp": ts, "anomaly_score": scores})
            windows[f"f{f}"] = cuts
            truth[f"f{f}"] = (n, scores, rows)
        pp = float(rng.choice([0.0, 0.15, 0.3]))
        report = nab_score_corpus(results, windows, profiles, probation_percent=pp)
        for name, cm in profiles.items():
            sweep = report.sweep(name)
            for t, s in zip(sweep["threshold"], sweep["score"], strict=True):
                want = sum(oracle_score(n, sc, rows, t, cm, pp) for n, sc, rows in truth.values())
                assert s == pytest.approx(want, abs=1e-9)
            assert report.profiles[name].score == pytest.approx(sweep["score"].max(), abs=1e-9)
            assert report.profiles[name].threshold == sweep["threshold"].iat[int(sweep["score"].argmax())]


# -------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_data_errors_naming_the_problem():
    good = pd.DataFrame({"timestamp": TS, "anomaly_score": np.zeros(100)})
    with pytest.raises(DataError, match="no windows entry"):
        nab_score_corpus({"a.csv": good}, {})
    with pytest.raises(DataError, match="does not occur"):
        nab_score_corpus({"a.csv": good}, {"a.csv": [(TS[5] + pd.Timedelta("1s"), TS[9])]})
    with pytest.raises(DataError, match="anomaly_score"):
        nab_score_corpus({"a.csv": good.rename(columns={"anomaly_score": "s"})}, WINDOW)
    with pytest.raises(DataError, match="finite"):
        nab_score_corpus({"a.csv": good.assign(anomaly_score=np.r_[np.nan, np.zeros(99)])}, WINDOW)
    with pytest.raises(DataError, match="ends"):
        nab_score_corpus({"a.csv": good}, {"a.csv": [(TS[9], TS[5])]})
    with pytest.raises(DataError, match="fnWeight"):
        nab_score_corpus({"a.csv": good}, WINDOW, {"bad": {"tpWeight": 1, "fpWeight": 1}})
    report = nab_score_corpus({"a.csv": good}, WINDOW)
    with pytest.raises(DataError, match="unknown NAB profile"):
        report.sweep("nope")
    corpus = NabCorpus.build({"a.csv": TS}, WINDOW)
    with pytest.raises(DataError, match="expected 100 anomaly scores"):
        corpus.score({"a.csv": np.zeros(99)})


# -------------------------------------------------------------------------------- real NAB


@pytest.fixture(scope="module")
def nab_files():
    from anomaly.evaluation.datasets import load_nab

    root = DATA / "nab"
    if not (root / "data").is_dir():
        pytest.skip(f"NAB data not found under {root}")
    return load_nab(root)


def test_real_corpus_perfect_detector_scores_100_and_null_0(nab_files):
    from anomaly.evaluation.datasets import nab_windows

    windows = nab_windows(nab_files)
    perfect, null = {}, {}
    for f in nab_files:
        starts = {w[0] for w in f.windows}
        hit = f.frame["timestamp"].isin(starts).to_numpy().astype(float)  # each window's first row
        perfect[f.key] = pd.DataFrame({"timestamp": f.frame["timestamp"], "anomaly_score": hit})
        null[f.key] = perfect[f.key].assign(anomaly_score=0.5)
    report = nab_score_corpus(perfect, windows)
    for name, cm in NAB_PROFILES.items():
        r = report.profiles[name]
        assert r.perfect_score == 55 * cm.tp_weight
        assert r.null_score == -55 * cm.fn_weight  # every NAB window lies after its probation
        assert r.normalized == pytest.approx(100.0, abs=1e-9)
        assert nab_score_corpus(null, windows).profiles[name].normalized == 0.0


def test_real_corpus_random_scores_sweep_is_consistent(nab_files):
    from anomaly.evaluation.datasets import nab_windows

    rng = np.random.default_rng(0)
    results = {f.key: pd.DataFrame({"timestamp": f.frame["timestamp"], "anomaly_score": rng.random(len(f.frame))})
               for f in nab_files}
    report = nab_score_corpus(results, nab_windows(nab_files))
    assert report.corpus.n_rows == 181_653
    for name in NAB_PROFILES:
        r = report.profiles[name]
        assert r.score == pytest.approx(report.sweep(name)["score"].max(), abs=1e-8)
        assert r.normalized <= 100.0


# ------------------------------------------------------------------------------------- SKAB


def test_skab_metrics_pool_counts_over_files():
    true = [np.array([0, 0, 1, 1, 1, 0]), np.array([0, 1, 1, 0])]
    pred = [np.array([0, 1, 1, 1, 0, 0]), np.array([np.nan, 0, 0, 1.0])]  # NaN: unscored -> negative
    m = skab_binary_metrics(true, pred)
    assert (m.tp, m.tn, m.fp, m.fn) == (2, 3, 2, 3)
    assert m.f1 == pytest.approx(2 / (2 + 2.5))  # TP / (TP + (FN + FP) / 2)
    assert m.far == pytest.approx(2 / 5)
    assert m.mar == pytest.approx(3 / 5)
    assert m.skab_rounded() == (0.44, 40.0, 60.0)
    # Pooled, not averaged per file: file 2 alone has F1 0 and file 1 alone 2/3.
    assert m.f1 != pytest.approx((2 / 3 + 0.0) / 2)
    single = skab_binary_metrics(pd.Series([1, 0, 1]), np.array([1, 0, 0]))
    assert (single.tp, single.tn, single.fp, single.fn) == (1, 1, 0, 1)


def test_skab_metrics_edge_cases():
    assert math.isnan(skab_binary_metrics([0, 0], [0, 0]).mar)
    assert math.isnan(skab_binary_metrics([0, 0], [0, 0]).f1)
    with pytest.raises(DataError, match="labels but"):
        skab_binary_metrics([[0, 1]], [[0, 1, 1]])
    with pytest.raises(DataError, match="as many prediction files"):
        skab_binary_metrics([[0, 1], [1]], [[0, 1]])


# ------------------------------------------------------------------- Telemanom's event counting


def test_event_counting_worked_example():
    labelled = [(10, 20), (30, 40)]
    # a predicted run over both labelled sequences matches only the first
    assert telemanom_event_counts(labelled, [(15, 35)]) == EventCounts(tp=1, fp=0, fn=1)
    # a run touching none is one false positive
    assert telemanom_event_counts(labelled, [(50, 60)]) == EventCounts(tp=0, fp=1, fn=2)
    # a labelled sequence touched by several runs counts once, and the extra runs are not false positives
    assert telemanom_event_counts(labelled, [(10, 10), (12, 14), (20, 22), (40, 45)]) == EventCounts(2, 0, 0)
    # inclusive bounds: a run ending the row before a sequence starts misses it
    assert telemanom_event_counts(labelled, [(0, 9), (21, 29)]) == EventCounts(tp=0, fp=2, fn=2)
    # "first" is the label file's order, not time order (P-11 lists its later sequence first)
    assert telemanom_event_counts([(30, 40), (10, 20)], [(15, 35), (12, 12)]) == EventCounts(2, 0, 0)
    assert telemanom_event_counts([(30, 40), (10, 20)], [(15, 35)]) == EventCounts(1, 0, 1)
    assert telemanom_event_counts(labelled, []) == EventCounts(tp=0, fp=0, fn=2)


def test_event_counts_sum_over_channels_and_give_precision_recall_f1():
    total = EventCounts(19, 38, 17) + EventCounts(1, 2, 3)
    assert total == EventCounts(20, 40, 20)
    assert total.precision == pytest.approx(1 / 3) and total.recall == pytest.approx(0.5)
    assert total.f1 == pytest.approx(0.4)
    assert np.isnan(EventCounts(0, 0, 0).precision) and np.isnan(EventCounts(0, 0, 0).f1)


def test_predicted_sequences_are_maximal_runs_of_flagged_rows():
    assert predicted_sequences(np.array([True, True, False, True])) == [(0, 1), (3, 3)]
    assert predicted_sequences(np.zeros(5, dtype=np.int8)) == []
    flags = np.zeros(100, dtype=bool)
    flags[[5, 6, 7, 50, 99]] = True
    runs = predicted_sequences(flags)
    assert runs == [(5, 7), (50, 50), (99, 99)]
    assert telemanom_event_counts([(0, 5), (49, 49)], runs) == EventCounts(tp=1, fp=2, fn=1)
    with pytest.raises(DataError, match="ends before"):
        telemanom_event_counts([(5, 4)], [])
