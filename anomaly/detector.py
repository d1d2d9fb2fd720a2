"""The streaming detector: THE entry point for scoring readings of a fleet.

Why it exists: the service, the CLI, the evaluation commands and notebooks all score readings
the same way, through :meth:`StreamingDetector.process`. One call takes readings of many devices
in any order and any mix (single readings, windows); per device they are taken in timestamp
order, continuing from that device's remembered state.

One call's path (B devices in the call, T the most readings of one device, F features)::

    factorize device ids → sort by (device, timestamp) → drop duplicates / out-of-order readings
    → slots of the devices (new ones allocated) → pad to [B, T, F], fill missing features
    → per block of ROW_BLOCK devices: gather (h, c) [L, b, H] from the slabs → ONE forward pass → scatter back
    → residual = actual - forecast, over the device's own residual scale → surprise → smoothed
    surprise → decision statistic → episodes → events

Two episode rules (``DetectorConfig.episode_rule``), both on this one path:

- ``"threshold"``: the decision statistic against the calibrated threshold, with hysteresis
  (:class:`~anomaly.episodes.EpisodePolicy`); ``scores`` are that statistic in [0, 1].
- ``"novelty"``: per-device novelty records (:mod:`anomaly.adaptation`, kept in the state store's
  slabs) are fed the surprise of the *unscaled* residual (``actual - forecast`` against the training
  error model, not over the device's running residual scale: that scale absorbs a sustained shift
  within ~50 readings, which is exactly what should stay visible) and the scaled values; an alert is a
  record beaten by ``novelty_tolerance``, an episode opens on a beaten error record and closes when the
  slow error average is back within it. ``scores`` are the novelty alert scores, ``score_threshold``
  the novelty threshold, ``alerts`` the novelty alerts. Differences: a stuck sensor's reading gets
  the maximum surprise only under the threshold rule (fed to the records it would blind the device
  for several half-lives); a gap reset restarts the network but keeps the novelty records *and* the
  novelty episode (no ``end`` event: closed by a gap, an ongoing incident could not reopen it).
  With ``seasonal_period`` P set, each device also keeps a ``[P, F]`` profile of its last cycle, indexed
  by time phase; the surprise of ``reading - profile`` (the bundle's ``seasonal_scorer``) is a second
  error channel with records of its own (NaN, so ignored, until the phase has a reference). The one-step
  forecaster cannot see a cycle whose shape changes smoothly (a daily peak that stays low); the
  seasonal residual does. With ``seasonal_explains`` (the default) the forecaster's channel is fed the
  *smaller* of the two surprises: a reading the device's cycle explains (the switch-on it makes at this
  time every day) is not novel just because the one-step forecaster could not anticipate it; a reading
  neither the recent past nor the cycle explains still is, and the seasonal channel alone still sees a
  reading that is wrong for its phase. Costs T more vectorised gather/scatter steps of ``[B, F]`` per call.

Context inputs (``bundle.context``, Fc of them): a batch carries ``bundle.inputs`` (the F features, then
the context); the network sees the context at every step (scaled by the bundle's ``context_scaler``; a
missing value is the device's last known one, kept in the store's ``last_context``, across gaps too; one
never seen is the training mean), but nothing downstream of it does: no forecast, residual, score,
``expected``, ``actual`` or ``contributions`` of a context input. A reading without any feature but with
context values (a command on its own) only updates the device's last known context, in time order with
its other readings (a reading later in the same call sees it): status ``CONTEXT``, no score, no step.

Cost per call: one LSTM forward pass over [B, T, F] (in cache-sized blocks of devices), O(N log N) numpy
for grouping (no hashing of ids when they equal the previous call's, all distinct), and T
vectorised steps of smoothing/episode logic; Python per device only where devices are new
(dictionary insert) and per event. A gap longer than ``gap_factor`` nominal intervals inside one
call splits that device's readings into another pass (rare).

What it must not do: know about Kafka, partitions or offsets (``streams`` maps rows back to them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from anomaly.adaptation import novelty_step
from anomaly.bundle import ModelBundle
from anomaly.episodes import EpisodePolicy
from anomaly.errors import InvalidReadingError
from anomaly.events import AnomalyEvent, ProcessResult, ReadingStatus
from anomaly.readings import ReadingBatch
from anomaly.scoring import (
    MAX_SURPRISE,
    decision_surprise,
    normalize_residuals,
    repeat_runs,
    score_from_surprise,
    seasonal_phase,
    seasonal_residuals,
    smooth_surprise,
)
from anomaly.state import NO_TIMESTAMP, DeviceStateStore

__all__ = ["StreamingDetector", "score_frame"]

logger = logging.getLogger(__name__)

INPUT_CLIP = 1e4
"""Scaled inputs are clipped to ±this many training standard deviations before the LSTM: far beyond
anything normal (the score saturates long before), yet finite, so a device's state survives garbage."""

ROW_BLOCK = 2048
"""Devices per forward pass. A pass over B devices writes the gates, ``[B, 4H]`` floats (10 MB for 10,000
devices at H = 64), and reads them back; blocks of 2,048 (2 MB) stay in cache. Measured for 10,000 devices,
one thread, on a shared 2-core machine: the LSTM step 1.3-1.7x faster than in one pass; whole calls of one
reading per device 1.5x faster, with blocks of 1,024 to 5,000 devices within noise of each other."""


class StreamingDetector:
    """Scores readings of a fleet against one model bundle, remembering each device's state.

    Parameters
    ----------
    bundle : ModelBundle
        The model, scaler, normal-error model and detector settings.
    capacity : int
        Initial number of device slots (grows by doubling).

    Examples
    --------
    >>> bundle = ModelBundle.untrained(["x"], hidden_size=8).with_config(warmup_steps=2)
    >>> det = StreamingDetector(bundle)
    >>> batch = ReadingBatch.from_arrays(["a", "a", "b", "a"], [0, 1000, 0, 1000], [[1.0], [1.1], [5.0], [1.1]])
    >>> res = det.process(batch)
    >>> [ReadingStatus(s).label for s in res.status]
    ['warmup', 'warmup', 'warmup', 'duplicate']
    >>> res = det.process(ReadingBatch.from_arrays(["a"], [2000], [[1.2]]))
    >>> bool(0.0 <= res.scores[0] <= 1.0), res.counts()["scored"]
    (True, 1)
    """

    def __init__(self, bundle: ModelBundle, capacity: int = 1024):
        self.bundle = bundle
        self.config = bundle.config
        self.model = bundle.model.eval()
        self.features = bundle.features
        self.context = bundle.context
        self.inputs = bundle.inputs
        self.novelty_config = self.config.novelty if self.config.episode_rule == "novelty" else None
        # the seasonal channel is one of the novelty rule's error channels: without that rule, no profile
        period = self.config.seasonal_period if self.novelty_config is not None else None
        self.store = DeviceStateStore(self.model.num_layers, self.model.hidden_size, len(self.features),
                                      model_version=bundle.version, capacity=capacity,
                                      novelty_alphas=len(self.config.novelty_alphas) if self.novelty_config else 0,
                                      seasonal_period=period or 0, n_context=len(self.context))
        self.policy = EpisodePolicy(enter=self.config.threshold,
                                    exit=self.config.threshold * self.config.exit_ratio,
                                    min_duration=self.config.min_duration, cooldown=self.config.cooldown)
        if self.novelty_config is not None:
            self.score_threshold = float(np.float32(self.novelty_config.threshold))
        else:
            self.score_threshold = float(score_from_surprise(self.config.threshold))
        self._distinct_ids: np.ndarray | None = None  # the previous call's device ids, if all distinct

    @property
    def model_version(self) -> str:
        return self.bundle.version

    def process(self, batch: ReadingBatch) -> ProcessResult:
        """Score a batch of readings; advances the state of every device in it.

        ``batch`` holds :attr:`inputs` (the features, then any context inputs). Returns a
        :class:`ProcessResult` aligned with ``batch`` (row i of every array describes ``batch`` row i),
        with the episode events the batch caused.
        """
        if batch.n_features != len(self.inputs):
            context = f" and {len(self.context)} context inputs {list(self.context)}" if self.context else ""
            raise InvalidReadingError(f"expected {len(self.features)} features {list(self.features)}{context}, "
                                      f"got {batch.n_features} columns")
        n = len(batch)
        result = ProcessResult(
            scores=np.full(n, np.nan, dtype=np.float32), raw_scores=np.full(n, np.nan, dtype=np.float32),
            status=np.full(n, ReadingStatus.SCORED, dtype=np.int8), anomalous=np.zeros(n, dtype=bool),
            expected=np.full((n, len(self.features)), np.nan, dtype=np.float32))
        if n == 0:
            return result
        codes, uniques = self._factorize(batch.device_ids)
        order = np.lexsort((batch.timestamps_ms, codes))
        slots = self.store.slots_for(uniques)
        n_f = len(self.features)
        missing = np.isnan(batch.values[:, :n_f])
        empty = missing.all(axis=1)[order] if missing.any() else None
        context_rows = None
        if empty is not None and empty.any():  # a reading with no value must not pass for a normal one
            result.status[order[empty]] = ReadingStatus.EMPTY
            if self.context:
                batch, context_rows = self._fold_context(batch, codes, order, empty, slots, result)
            order = order[~empty]
        dev = codes[order]
        ts = batch.timestamps_ms[order]
        state_last = self.store.last_ts[slots][dev]
        first = np.r_[True, dev[1:] != dev[:-1]]
        prev_in_batch = np.r_[NO_TIMESTAMP, ts[:-1]]
        prev_in_batch[first] = NO_TIMESTAMP
        out_of_order = ts < state_last
        duplicate = ~out_of_order & ((ts == state_last) | (ts == prev_in_batch))
        status = result.status
        status[order[out_of_order]] = ReadingStatus.OUT_OF_ORDER
        status[order[duplicate]] = ReadingStatus.DUPLICATE
        accepted = np.flatnonzero(~(out_of_order | duplicate))
        if len(accepted) == 0:
            if context_rows is not None:  # commands alone
                self._keep_context(batch, codes, slots, result)
            return result
        a_dev, a_ts = dev[accepted], ts[accepted]
        a_first = np.r_[True, a_dev[1:] != a_dev[:-1]]
        prev_ts = np.r_[NO_TIMESTAMP, a_ts[:-1]]
        prev_ts[a_first] = self.store.last_ts[slots[a_dev[a_first]]]
        if self.config.gap_policy == "reset":
            gap = (prev_ts != NO_TIMESTAMP) & (a_ts - prev_ts > self.config.gap_ms)
        else:
            gap = np.zeros(len(a_ts), dtype=bool)
        # readings after a gap inside this call start a new pass: each pass sees a device's
        # readings as one contiguous run whose only possible reset is at its first reading
        inner_gaps = np.cumsum(gap & ~a_first)
        group_start = np.maximum.accumulate(np.where(a_first, np.arange(len(a_first)), 0))
        segment = inner_gaps - inner_gaps[group_start]
        rows = order[accepted]
        values = batch.values[rows]
        if segment.any():
            for p in range(int(segment.max()) + 1):
                sel = np.flatnonzero(segment == p)
                self._run_pass(a_dev[sel], a_ts[sel], values[sel], rows[sel], gap[sel], slots, batch, result)
        else:  # the common case: one pass, no copies
            self._run_pass(a_dev, a_ts, values, rows, gap, slots, batch, result)
        result.gap_resets = int(gap.sum())
        if context_rows is not None:
            self._keep_context(batch, codes, slots, result)
        return result

    def _fold_context(self, batch: ReadingBatch, codes: np.ndarray, order: np.ndarray, empty: np.ndarray,
                      slots: np.ndarray, result: ProcessResult) -> tuple[ReadingBatch, np.ndarray | None]:
        """Context-only readings (no feature, some context) handed on to the readings after them.

        ``order`` ``[N]`` sorts the batch by (device, time); ``empty`` ``[N]`` (in that order) flags readings
        without any feature. Returns the batch with each reading's missing context values filled from the
        device's earlier readings in this call (a device's first readings keep NaN: the store's
        ``last_context`` fills them), and the rows of the accepted context-only readings (``None`` if none).
        A context-only reading older than the device's last scored one is out of order and ignored.
        """
        n_f = len(self.features)
        ctx = batch.values[order, n_f:]
        has_ctx = ~np.isnan(ctx).all(axis=1)
        stale = batch.timestamps_ms[order] < self.store.last_ts[slots[codes[order]]]
        only = empty & has_ctx
        result.status[order[only & stale]] = ReadingStatus.OUT_OF_ORDER
        accepted = only & ~stale
        if not accepted.any():
            return batch, None
        result.status[order[accepted]] = ReadingStatus.CONTEXT
        ctx[stale] = np.nan  # an old reading must not overwrite a newer value
        dev = codes[order]
        first = np.r_[True, dev[1:] != dev[:-1]]
        start = np.maximum.accumulate(np.where(first, np.arange(len(dev)), 0))
        src = np.where(np.isnan(ctx), -1, np.arange(len(dev))[:, None])
        np.maximum.accumulate(src, axis=0, out=src)
        known = src >= start[:, None]  # a source inside the device's own readings
        filled = np.where(known, ctx[np.maximum(src, 0), np.arange(ctx.shape[1])[None, :]], np.nan)
        values = batch.values.copy()
        values[order, n_f:] = filled.astype(np.float32)
        return (ReadingBatch(batch.device_ids, batch.timestamps_ms, values),
                order[accepted])

    def _keep_context(self, batch: ReadingBatch, codes: np.ndarray, slots: np.ndarray,
                      result: ProcessResult) -> None:
        """Remember the context of each device whose latest reading in this call was context-only.

        Each reading's context was filled in time order (:meth:`_fold_context`), so a device's latest
        reading that touched its state holds its latest context; when that reading was advanced through
        the network, :meth:`_run_pass` stored it already.
        """
        order = np.lexsort((batch.timestamps_ms, codes))
        touched = np.isin(result.status[order], (ReadingStatus.SCORED, ReadingStatus.WARMUP, ReadingStatus.CONTEXT))
        live = order[touched]
        dev = codes[live]
        last = live[np.r_[dev[1:] != dev[:-1], True]]
        last = last[result.status[last] == ReadingStatus.CONTEXT]
        if not len(last):
            return
        scaled = self.bundle.context_scaler.transform(batch.values[last, len(self.features):])  # type: ignore[union-attr]
        target = slots[codes[last]]
        self.store.last_context[target] = np.where(np.isnan(scaled), self.store.last_context[target], scaled)

    def _factorize(self, device_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``pd.factorize(device_ids)``: codes ``[N]`` and distinct ids ``[U]`` in order of appearance.

        A fleet whose devices each report once per poll sends the same ids again and again: when they
        equal the previous call's distinct ids, the codes are ``0..N-1`` without hashing any id.
        """
        last = self._distinct_ids
        if last is not None and device_ids.shape == last.shape and np.array_equal(device_ids, last):
            return np.arange(len(device_ids)), device_ids
        codes, uniques = pd.factorize(device_ids)
        # a copy: the caller may reuse its array
        self._distinct_ids = device_ids.copy() if len(uniques) == len(device_ids) else None
        return codes, uniques

    def _run_pass(self, dev: np.ndarray, ts: np.ndarray, values: np.ndarray, rows: np.ndarray,
                  gap: np.ndarray, slots_of_code: np.ndarray, batch: ReadingBatch,
                  result: ProcessResult) -> None:
        """Advance devices through their accepted readings (sorted by device, then time)."""
        store, cfg, scaler = self.store, self.config, self.bundle.scaler
        starts = np.r_[True, dev[1:] != dev[:-1]]
        group = np.cumsum(starts) - 1
        start_pos = np.flatnonzero(starts)
        k = np.arange(len(dev)) - start_pos[group]
        lengths = np.bincount(group)
        b, t_steps, f = len(lengths), int(lengths.max()), len(self.features)
        full = bool((lengths == t_steps).all())
        # [B, T, ...] → [N, ...] in reading order, and each device's last step (views where possible)
        cells = (slice(None), 0) if t_steps == 1 else (group, k)
        last_cells = (slice(None), t_steps - 1) if full else (np.arange(b), lengths - 1)
        slots = slots_of_code[dev[starts]]
        reset = gap[starts]
        if reset.any():
            if self.novelty_config is None:
                self._close_on_reset(np.flatnonzero(reset & store.in_episode[slots]), slots, start_pos, ts, rows,
                                     batch, result)
            # the novelty rule's episode belongs to its records, which outlive the network's state: closed
            # by a gap, an ongoing incident could not reopen it (the record it beat has grown since)
            store.reset(slots[reset], keep_novelty=self.novelty_config is not None)

        raw = np.full((b, t_steps, f), np.nan, dtype=np.float32)
        # clipped so that an absurd (but finite) value cannot overflow the network's state
        raw[cells] = np.clip(scaler.transform(values[:, :f].astype(np.float64)), -INPUT_CLIP, INPUT_CLIP)
        x = _forward_fill(raw, store.last_input[slots], full, bool(np.isnan(values[:, :f]).any()))
        if self.context:  # the context inputs, filled from the last known values (never seen: the mean, 0)
            ctx = np.full((b, t_steps, len(self.context)), np.nan, dtype=np.float32)
            ctx[cells] = np.clip(self.bundle.context_scaler.transform(  # type: ignore[union-attr]
                values[:, f:].astype(np.float64)), -INPUT_CLIP, INPUT_CLIP)
            ctx = _forward_fill(ctx, store.last_context[slots], full, True)
            store.last_context[slots] = ctx[last_cells]
            x = np.concatenate([x, np.nan_to_num(ctx, nan=0.0)], axis=2)
        pred = self._advance(x, lengths, full, slots)

        expected = np.empty_like(raw)
        expected[:, 0] = store.last_pred[slots]
        expected[:, 1:] = pred[:, :-1]
        life = store.steps[slots][:, None] + np.arange(t_steps)[None, :]
        valid = np.arange(t_steps)[None, :] < lengths[:, None]
        scored = valid & (life >= cfg.warmup_steps)
        scorer = self.bundle.scorer
        stuck_cells = None
        stuck = np.zeros_like(scored)
        if cfg.stuck_after is not None:  # a forecaster follows a stuck value: count exact repeats instead
            runs, store.repeat_run[slots] = repeat_runs(raw, valid, store.last_input[slots], store.repeat_run[slots])
            stuck_cells = runs >= np.asarray(cfg.stuck_after, dtype=np.int16)
            stuck = stuck_cells.any(axis=2) & scored
        residual, ratio = normalize_residuals(raw - expected, scored & ~stuck, store.residual_ratio[slots],
                                              scorer.reference_var, cfg.scale_alpha)
        store.residual_ratio[slots] = ratio
        surprise = np.where(scored, scorer.surprise(residual), np.float32(0.0))
        surprise = np.where(stuck, np.float32(MAX_SURPRISE), surprise)
        smoothed = smooth_surprise(surprise, scored, store.smoothed[slots], cfg.smoothing_alpha)
        decision = decision_surprise(smoothed, surprise, cfg.point_margin)
        if self.novelty_config is not None:
            before = store.in_episode[slots]
            # not MAX_SURPRISE where stuck: that would raise the device's error records to the maximum and
            # leave it blind to errors for several half-lives (stuck sensors are the threshold rule's to flag)
            absolute = np.where(scored, scorer.surprise(raw - expected), np.float32(0.0))
            if store.season is None:
                errors = absolute
            else:  # the forecaster channel: the smaller surprise (NaN seasonal: no reference yet, its own)
                seasonal = self._seasonal_surprise(raw, ts, cells, valid, scored, slots)
                forecaster = np.fmin(absolute, seasonal) if cfg.seasonal_explains else absolute
                errors = np.stack([forecaster, seasonal], axis=2)
            records = store.novelty.take(slots)  # type: ignore[union-attr]
            nov = novelty_step(self.novelty_config, records, before, store.run_length[slots], errors, raw, scored)
            store.novelty.put(slots, records)  # type: ignore[union-attr]
            previous = np.concatenate([before[:, None], nov.anomalous[:, :-1]], axis=1)
            started, ended = nov.anomalous & ~previous, previous & ~nov.anomalous
            in_episode = nov.anomalous
            final_in_episode, final_run = nov.in_episode, nov.calm_run.astype(np.int32)
            score_bt = nov.alert_score
            event_score = nov.novelty
        else:
            episodes = self.policy.run(decision, scored, store.in_episode[slots], store.run_length[slots])
            started, ended, in_episode = episodes.started, episodes.ended, episodes.in_episode
            final_in_episode, final_run = episodes.final_in_episode, episodes.final_run_length
            score_bt = event_score = score_from_surprise(decision)

        store.steps[slots] += lengths
        store.last_ts[slots] = ts[start_pos + lengths - 1]
        store.smoothed[slots] = smoothed[:, -1]
        store.in_episode[slots] = final_in_episode
        store.run_length[slots] = final_run
        store.last_pred[slots] = pred[last_cells]
        store.last_input[slots] = x[last_cells][:, :f]

        is_scored = scored[cells]
        result.status[rows[~is_scored]] = ReadingStatus.WARMUP
        result.scores[rows] = np.where(is_scored, score_bt[cells], np.nan)
        result.raw_scores[rows] = np.where(is_scored, score_from_surprise(surprise[cells]), np.nan)
        result.anomalous[rows] = in_episode[cells]
        if self.novelty_config is not None:
            result.novelty[rows] = np.where(is_scored, nov.novelty[cells], np.nan)
            result.alerts[rows] = nov.alerts[cells]
        else:
            result.alerts[rows] = started[cells]
        exp_units = scaler.inverse(expected[cells])
        exp_units[life[cells] == 0] = np.nan
        result.expected[rows] = exp_units

        ev_b, ev_t = np.nonzero(started | ended)
        if len(ev_b):
            self._emit(ev_b, ev_t, started, event_score, residual, expected, start_pos, ts, rows, slots,
                       batch, result, stuck_cells)

    def _seasonal_surprise(self, raw: np.ndarray, ts: np.ndarray, cells: tuple, valid: np.ndarray,
                           scored: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Surprise ``[B, T]`` of each reading against its device's seasonal profile (NaN: not scored, or no
        reference yet); advances the profiles of ``slots`` over every valid reading, warm-up included."""
        cfg, store = self.config, self.store
        period = store.season.shape[1]  # type: ignore[union-attr]
        ts_bt = np.zeros(valid.shape, dtype=np.int64)
        ts_bt[cells] = ts
        phase = seasonal_phase(ts_bt, cfg.nominal_interval_ms, period)
        residual = seasonal_residuals(store.season, slots, phase, raw, valid, cfg.seasonal_alpha)  # type: ignore[arg-type]
        known = scored & ~np.isnan(residual).all(axis=2)
        return np.where(known, self.bundle.seasonal_scorer.surprise(residual),  # type: ignore[union-attr]
                        np.float32(np.nan))

    def _advance(self, x: np.ndarray, lengths: np.ndarray, full: bool, slots: np.ndarray) -> np.ndarray:
        """Run the model over ``x`` ``[B, T, F + Fc]`` (row i: ``lengths[i]`` readings of the device in ``slots[i]``)
        from the devices' (h, c), in blocks of ``ROW_BLOCK`` devices; writes (h, c) back to the slabs and
        returns the predictions ``[B, T, F]``. ``full``: every row has T readings.

        Per block: gather (h, c) ``[L, b, H]`` by slot, one forward pass, scatter (numpy's fancy assignment:
        a third of the time of torch's ``index_copy_``).
        """
        store = self.store
        h_slab, c_slab = store.h.numpy(), store.c.numpy()
        pred = np.empty((*x.shape[:2], self.model.n_features), dtype=np.float32)
        x_t = torch.from_numpy(x)
        with torch.inference_mode():
            for lo in range(0, len(slots), ROW_BLOCK):
                block = slots[lo:lo + ROW_BLOCK]
                index = torch.from_numpy(block)
                lens = None if full else torch.from_numpy(lengths[lo:lo + ROW_BLOCK])
                out, (hn, cn) = self.model(x_t[lo:lo + ROW_BLOCK],
                                           (store.h.index_select(1, index), store.c.index_select(1, index)), lens)
                h_slab[:, block] = hn.numpy()
                c_slab[:, block] = cn.numpy()
                pred[lo:lo + ROW_BLOCK] = out.numpy()
        return pred

    def _emit(self, ev_b: np.ndarray, ev_t: np.ndarray, started: np.ndarray, event_score: np.ndarray,
              residual: np.ndarray, expected: np.ndarray, start_pos: np.ndarray, ts: np.ndarray,
              rows: np.ndarray, slots: np.ndarray, batch: ReadingBatch, result: ProcessResult,
              stuck_cells: np.ndarray | None) -> None:
        """Build events for the few (device, step) cells where an episode started or ended.

        ``event_score`` ``[B, T]``: the score an event carries, in [0, 1] (the threshold rule's statistic,
        or the novelty rule's uncapped novelty).
        """
        scaler, store = self.bundle.scaler, self.store
        contributions = self.bundle.scorer.contributions(residual[ev_b, ev_t])
        if stuck_cells is not None:  # a stuck reading is explained by its stuck sensors, not its residual
            cells = stuck_cells[ev_b, ev_t]
            is_stuck = cells.any(axis=1)
            contributions[is_stuck] = cells[is_stuck] / cells[is_stuck].sum(axis=1, keepdims=True)
        exp_units = scaler.inverse(expected[ev_b, ev_t])
        order = np.lexsort((ev_t, ev_b))
        for i in order:
            bi, ti = int(ev_b[i]), int(ev_t[i])
            pos = start_pos[bi] + ti
            row = int(rows[pos])
            kind = "start" if started[bi, ti] else "end"
            if kind == "start":
                store.episode_start[slots[bi]] = ts[pos]
            result.events.append(AnomalyEvent(
                device_id=str(batch.device_ids[row]), ts_ms=int(ts[pos]), kind=kind,
                score=float(event_score[bi, ti]), threshold=self.score_threshold,
                expected=self._named(exp_units[i]), actual=self._named(batch.values[row, :len(self.features)]),
                contributions=self._named(contributions[i]), model_name=self.bundle.name,
                model_version=self.bundle.version, row=row,
                episode_start_ms=int(store.episode_start[slots[bi]])))

    def _close_on_reset(self, which: np.ndarray, slots: np.ndarray, start_pos: np.ndarray, ts: np.ndarray,
                        rows: np.ndarray, batch: ReadingBatch, result: ProcessResult) -> None:
        """A device in an episode whose state is reset after a gap gets an ``end`` event at that reading."""
        for bi in which.tolist():
            pos, slot = start_pos[bi], slots[bi]
            row = int(rows[pos])
            result.events.append(AnomalyEvent(
                device_id=str(batch.device_ids[row]), ts_ms=int(ts[pos]), kind="end", score=0.0,
                threshold=self.score_threshold, expected={}, actual=self._named(batch.values[row, :len(self.features)]),
                contributions={}, model_name=self.bundle.name, model_version=self.bundle.version, row=row,
                episode_start_ms=int(self.store.episode_start[slot])))
            logger.info("device %s (slot %d): episode closed by a gap before %d", batch.device_ids[row], slot,
                        ts[pos])

    def _named(self, values: np.ndarray) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.features, values, strict=True) if np.isfinite(v)}

    def evict_idle(self, now_ms: int, ttl_ms: int) -> list[str]:
        """Forget devices silent for longer than ``ttl_ms`` of event time; see :meth:`DeviceStateStore.evict_idle`."""
        return self.store.evict_idle(now_ms, ttl_ms)


def _forward_fill(raw: np.ndarray, last: np.ndarray, full: bool, any_missing: bool) -> np.ndarray:
    """``raw`` ``[B, T, K]`` with each missing value (NaN) replaced by the device's previous one in time, the
    first steps' from ``last`` ``[B, K]`` (which may hold NaN: never seen); padding after a short run is 0.

    ``any_missing``: some reading lacks a value (else only the padding is NaN: the cheap path).
    """
    if not any_missing:
        return raw if full else np.nan_to_num(raw, nan=0.0)
    t_steps = raw.shape[1]
    filled = np.concatenate([last[:, None, :], raw], axis=1)
    idx = np.where(np.isnan(filled), 0, np.arange(t_steps + 1)[None, :, None])
    np.maximum.accumulate(idx, axis=1, out=idx)
    return np.take_along_axis(filled, idx, axis=1)[:, 1:]


def score_frame(detector: StreamingDetector, frame: pd.DataFrame, time_col: str,
                device_col: str | None = None, chunk_rows: int = 100_000,
                features: Sequence[str] | None = None) -> pd.DataFrame:
    """Score a table in arrival order; returns ``frame`` with score, is_anomaly, status and expected_* columns.

    Rows are handed to :meth:`StreamingDetector.process` in chunks of ``chunk_rows`` (streaming:
    results do not depend on the chunk size). ``features``: the table's columns for the detector's
    inputs, in their order (default: the bundle's feature and context names).
    """
    feats = list(features or detector.inputs)
    out = frame.copy()
    scores, anomalous, status, expected = [], [], [], []
    for start in range(0, len(frame), chunk_rows):
        part = frame.iloc[start:start + chunk_rows]
        res = detector.process(ReadingBatch.from_frame(part, feats, time_col=time_col, device_col=device_col))
        scores.append(res.scores)
        anomalous.append(res.anomalous)
        status.append(res.status)
        expected.append(res.expected)
    n_f = len(detector.features)
    out["score"] = np.concatenate(scores) if scores else np.empty(0, np.float32)
    out["is_anomaly"] = np.concatenate(anomalous) if anomalous else np.empty(0, bool)
    out["status"] = [ReadingStatus(s).label for s in (np.concatenate(status) if status else [])]
    exp = np.concatenate(expected) if expected else np.empty((0, n_f), np.float32)
    for i, name in enumerate(feats[:n_f]):
        out[f"expected_{name}"] = exp[:, i]
    return out
