"""Every Prometheus metric the gateway exports, defined once.

The hot path only bumps plain dict counters and numba histograms; this collector turns them
into Prometheus families at scrape time, so requests never pay for prometheus_client.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.background.events import DROP_REASONS, KINDS, OUTCOMES, Events
from gateway.background.predictions import REASONS, PredictionLog
from gateway.background.quality import Accumulator, Quality
from gateway.background.shadow import ShadowRunner
from gateway.http.limits import Limits
from gateway.http.refusals import REFUSALS
from gateway.serving.batcher import BatchingRuntime
from gateway.serving.registry import Registry
from gateway.serving.traffic import GuardMetrics, View
from monitors.quality import BinaryQuality
from router.policy.guard_spec import QUALITY_METRICS
from router.state.join import EVICTION_REASONS
from router.state.table import RouteTable

# Latency buckets in seconds (upper bounds), from 100 µs to 10 s.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
STATUS_CODES = {"insufficient": 0, "stable": 1, "watch": 2, "act": 3}


class GatewayCollector(Collector):
    def __init__(
        self,
        registry: Registry,
        table: RouteTable,
        shadows: ShadowRunner,
        guards: GuardMetrics | None = None,
    ) -> None:
        """Set ``view`` (request counts and monitor counts of the scope to report) before
        each collection; everything else is read from this process."""
        self.registry = registry
        self.table = table
        self.shadows = shadows
        self.guards = guards
        self.view = View()

    def collect(self) -> Iterator[Metric]:
        yield from self._traffic()
        yield from self._versions()
        yield from self._routes()
        yield from self._shadows()
        yield from self._batching()
        if self.guards is not None:
            yield from self._guards(self.guards)
        yield self._refused()

    def _refused(self) -> Metric:
        """This process's refused credentials, by reason (a fixed set; gateway.errors)."""
        refused = CounterMetricFamily(
            "turnout_refused",
            "Requests refused for their credentials (401), by reason; logged at most 10 a "
            "reason per 10 s",
            labels=["reason"],
        )
        for reason, count in sorted(REFUSALS.counts.items()):
            refused.add_metric([reason], count)
        return refused

    def _batching(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        batches = CounterMetricFamily("turnout_batches", "Merged onnxruntime runs", labels=labels)
        rows = CounterMetricFamily(
            "turnout_batch_rows",
            "Rows over all merged runs (rows / batches = mean batch size)",
            labels=labels,
        )
        rejected = CounterMetricFamily(
            "turnout_queue_rejected",
            "Requests refused with 429: the version's queue was full",
            labels=labels,
        )
        timed_out = CounterMetricFamily(
            "turnout_deadline_exceeded",
            "Requests answered 504: their deadline passed before they ran",
            labels=labels,
        )
        abandoned = CounterMetricFamily(
            "turnout_abandoned",
            "Requests dropped from the queue unrun: their client left (answered 499)",
            labels=labels,
        )
        inline = CounterMetricFamily(
            "turnout_inline_runs",
            "Runs made on the event loop thread (light requests, alone or merged: no thread hop)",
            labels=labels,
        )
        depth = GaugeMetricFamily(
            "turnout_queue_depth", "Requests waiting for the version's session", labels=labels
        )
        unlisted = CounterMetricFamily(
            "turnout_batch_sizes_unlisted",
            "Successful runs left out of the statistics' batch_stats: their size came after "
            "the 128 distinct sizes a version keeps",
            labels=labels,
        )
        for loaded in self.registry.loaded():
            runtime = loaded.runtime
            if not isinstance(runtime, BatchingRuntime):
                continue
            key = [loaded.info.model, loaded.info.version]
            stats = runtime.stats
            batches.add_metric(key, stats.batches)
            rows.add_metric(key, stats.rows)
            rejected.add_metric(key, stats.rejected)
            timed_out.add_metric(key, stats.timed_out)
            abandoned.add_metric(key, stats.abandoned)
            inline.add_metric(key, stats.inline)
            depth.add_metric(key, runtime.queue_depth)
            unlisted.add_metric(key, stats.unlisted[0])
        yield from (batches, rows, rejected, timed_out, abandoned, inline, depth, unlisted)

    def _traffic(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "turnout_requests",
            "Inference requests answered, by status code and route role",
            labels=["model", "version", "role", "code"],
        )
        for labels, n in sorted(self.view.requests.items()):
            requests.add_metric(list(labels), n)
        yield requests
        inflight = GaugeMetricFamily(
            "turnout_requests_in_flight", "Inference requests being served", labels=["model"]
        )
        for model, n in sorted(self.view.inflight.items()):
            inflight.add_metric([model], n)
        yield inflight

    def _versions(self) -> Iterator[Metric]:
        info = InfoMetricFamily(
            "turnout_model",
            "Loaded model versions and their artifacts",
            labels=["model", "version"],
        )
        latency = {
            series: HistogramMetricFamily(
                f"turnout_{series}_duration_seconds",
                help_,
                labels=["model", "version"],
            )
            for series, help_ in (
                ("request", "End-to-end gateway time per inference request"),
                ("model", "Model execution time per inference request"),
            )
        }
        drift = _DriftFamilies()
        skipped = CounterMetricFamily(
            "turnout_monitor_skipped",
            "Requests this process's monitor could not count: a tensor's columns differ from the "
            "reference sample's",
            labels=["model", "version"],
        )
        for loaded in sorted(
            self.registry.loaded(), key=lambda lv: (lv.info.model, int(lv.info.version))
        ):
            labels = [loaded.info.model, loaded.info.version]
            info.add_metric(labels, {"sha256": loaded.info.sha256})
            skipped.add_metric(labels, loaded.monitor.skipped)
            counts = self.view.monitors.get((loaded.info.model, loaded.info.version))
            if counts is None:
                continue
            for series, histogram in loaded.monitor.latency_from(counts).items():
                family = latency["request" if series == "total" else "model"]
                cumulative = histogram.buckets(LATENCY_BUCKETS)
                buckets = [
                    (str(b), float(c)) for b, c in zip(LATENCY_BUCKETS, cumulative, strict=True)
                ]
                buckets.append(("+Inf", float(histogram.count)))
                family.add_metric(labels, buckets, histogram.sum)
            drift.add(labels, loaded.monitor.report(counts))
        yield info
        yield skipped
        yield from latency.values()
        yield from drift.families()

    def _routes(self) -> Iterator[Metric]:
        share = GaugeMetricFamily(
            "turnout_route_share",
            "Expected share of a model's answered traffic per version under its policy",
            labels=["model", "version", "strategy"],
        )
        revision = GaugeMetricFamily(
            "turnout_policy_revision", "Revision of the model's routing policy", labels=["model"]
        )
        for model, route in sorted(self.table.routes().items()):
            revision.add_metric([model], route.revision)
            for version, weight in sorted(route.policy.shares().items()):
                share.add_metric([model, version, route.strategy], weight)
        yield share
        yield revision
        resets = CounterMetricFamily(
            "turnout_store_resets",
            "Times this process found the shared state store behind it (it lost its state) and "
            "put its copy of the policies back",
        )
        resets.add_metric([], self.table.store_resets)
        yield resets
        yield from self._join()

    def _join(self) -> Iterator[Metric]:
        join = self.table.join
        evictions = CounterMetricFamily(
            "turnout_feedback_evictions",
            "Inference ids the feedback join let go before their window ended: the entry cap "
            "(entries), the byte cap (bytes), a new policy revision (policy)",
            labels=["reason"],
        )
        for reason in EVICTION_REASONS:
            evictions.add_metric([reason], join.evictions[reason])
        yield evictions
        entries = GaugeMetricFamily(
            "turnout_feedback_join_entries", "Inference ids the feedback join holds"
        )
        entries.add_metric([], join.entries)
        yield entries
        size = GaugeMetricFamily(
            "turnout_feedback_join_bytes", "Estimated memory of the feedback join's entries"
        )
        size.add_metric([], join.bytes)
        yield size

    def _shadows(self) -> Iterator[Metric]:
        labels = ["model", "version", "shadow"]
        families: dict[str, Any] = {
            "requests": CounterMetricFamily("turnout_shadow_requests", "Shadow copies compared", labels=labels),
            "errors": CounterMetricFamily("turnout_shadow_errors", "Shadow copies that failed", labels=labels),
            "dropped": CounterMetricFamily("turnout_shadow_dropped", "Shadow copies dropped: too many waiting or running", labels=labels),
            "mean_abs_diff": GaugeMetricFamily("turnout_shadow_mean_abs_diff", "Mean absolute difference of shadow and primary outputs", labels=labels),
            "disagreement_rate": GaugeMetricFamily("turnout_shadow_disagreement_ratio", "Share of rows where shadow and primary decide differently", labels=labels),
        }  # fmt: skip
        for (model, primary, shadow), d in sorted(self.shadows.divergence.items()):
            values = d.as_json()
            for key, family in families.items():
                value = values[key]
                if value is not None:
                    family.add_metric([model, primary, shadow], value)
        yield from families.values()
        deferrals = CounterMetricFamily(
            "turnout_shadow_deferrals",
            "Shadow runs put off because primary requests were waiting for the event loop",
        )
        deferrals.add_metric([], self.shadows.deferrals)
        yield deferrals

    def _guards(self, g: GuardMetrics) -> Iterator[Metric]:
        leader = GaugeMetricFamily(
            "turnout_guard_leader",
            "1 while this replica holds the guard lease and evaluates, else 0",
        )
        leader.add_metric([], 1.0 if g.leader else 0.0)
        yield leader
        evaluations = CounterMetricFamily(
            "turnout_guard_evaluations",
            "Guard evaluations, by verdict (pass, insufficient, breach)",
            labels=["model", "verdict"],
        )
        for (model, verdict), n in sorted(g.evaluations.items()):
            evaluations.add_metric([model, verdict], n)
        yield evaluations
        actions = CounterMetricFamily(
            "turnout_guard_actions",
            "Policy changes applied by guards (rollback, switch, drop_arm, drop_shadow, advance, promote)",
            labels=["model", "action"],
        )
        for (model, action), n in sorted(g.actions.items()):
            actions.add_metric([model, action], n)
        yield actions
        values = GaugeMetricFamily(
            "turnout_guard_value",
            "The value a guard compares with its threshold, latest evaluation (bounds, not point estimates: see docs/operations.md)",
            labels=["model", "version", "guard"],
        )
        for key, value in sorted(g.values.items()):
            values.add_metric(list(key), value)
        yield values
        thresholds = GaugeMetricFamily(
            "turnout_guard_threshold", "A guard's configured threshold", labels=["model", "guard"]
        )
        for pair, value in sorted(g.thresholds.items()):
            thresholds.add_metric(list(pair), value)
        yield thresholds
        window = GaugeMetricFamily(
            "turnout_guard_window_requests",
            "Requests answered by a version under test in the guard window",
            labels=["model", "version"],
        )
        for pair, n in sorted(g.requests.items()):
            window.add_metric(list(pair), n)
        yield window


class _DriftFamilies:
    def __init__(self) -> None:
        f = ["model", "version", "feature"]
        o = ["model", "version", "output"]
        self.psi = GaugeMetricFamily(
            "turnout_feature_psi",
            "Population stability index of an input feature, current window",
            labels=f,
        )
        self.status = GaugeMetricFamily(
            "turnout_feature_drift_status",
            "Drift status of a feature: 0 insufficient, 1 stable, 2 watch, 3 act",
            labels=f,
        )
        self.p_value = GaugeMetricFamily(
            "turnout_feature_drift_p_value",
            "Chi-square p-value of the feature's PSI under sampling noise",
            labels=f,
        )
        self.out_of_range = GaugeMetricFamily(
            "turnout_feature_out_of_range_ratio",
            "Share of current values outside the reference range",
            labels=f,
        )
        self.missing = GaugeMetricFamily(
            "turnout_feature_missing_ratio",
            "Share of current values that are NaN or infinite",
            labels=f,
        )
        self.pred_psi = GaugeMetricFamily(
            "turnout_prediction_psi",
            "Population stability index of a model output, current window",
            labels=o,
        )
        self.pred_status = GaugeMetricFamily(
            "turnout_prediction_drift_status",
            "Drift status of an output: 0 insufficient, 1 stable, 2 watch, 3 act",
            labels=o,
        )
        self.observed = GaugeMetricFamily(
            "turnout_drift_window_values",
            "Finite values counted in the current drift window",
            labels=f,
        )

    def add(self, labels: list[str], snapshot: dict[str, Any]) -> None:
        for column in snapshot["features"]:
            key = [*labels, column["name"]]
            _add(self.psi, key, column["psi"])
            _add(self.status, key, STATUS_CODES[column["status"]])
            _add(self.p_value, key, column["p_value"])
            _add(self.out_of_range, key, column["out_of_range"])
            _add(self.missing, key, column["missing"])
            _add(self.observed, key, column["count"])
        for column in snapshot["outputs"]:
            key = [*labels, column["name"]]
            _add(self.pred_psi, key, column["psi"])
            _add(self.pred_status, key, STATUS_CODES[column["status"]])

    def families(self) -> Iterator[Metric]:
        yield from (self.psi, self.status, self.p_value, self.out_of_range, self.missing,
                    self.observed, self.pred_psi, self.pred_status)  # fmt: skip


def _add(family: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
    if value is not None:
        family.add_metric(labels, value)


class ClientCollector(Collector):
    """Attribution and the extraction signal (gateway.http.clients), per client label: each
    configured API key's name, and ``_other``. Empty while no rate-limits document is in force;
    this process's own figures (not merged across workers)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def collect(self) -> Iterator[Metric]:
        fallback = GaugeMetricFamily(
            "turnout_rate_limit_fallback",
            "1 while the state store cannot be reached and this replica enforces its share of "
            "each rate limit (the limit / the live replicas) on its own",
        )
        fallback.add_metric([], 1.0 if self.limits.fallback else 0.0)
        replicas = GaugeMetricFamily(
            "turnout_rate_limit_replicas",
            "Live replicas last seen: in fallback, each enforces 1/this of every limit",
        )
        replicas.add_metric([], self.limits.replicas)
        yield from (fallback, replicas)
        if self.limits.gate is None:
            return
        labels = ["client"]
        requests = CounterMetricFamily(
            "turnout_client_requests", "Inference requests, by client", labels=labels
        )
        checked = CounterMetricFamily(
            "turnout_client_inputs_checked",
            "Admitted requests whose inputs were compared with the version's reference range",
            labels=labels,
        )
        outside = CounterMetricFamily(
            "turnout_client_inputs_outside",
            "Of those, requests with a feature outside the reference sample's [min, max]",
            labels=labels,
        )
        ratio = GaugeMetricFamily(
            "turnout_client_volume_ratio",
            "The client's request rate over 5 minutes / over its last hour (both EWMAs)",
            labels=labels,
        )
        for label, client in sorted(self.limits.clients.by_label.items()):
            requests.add_metric([label], client.requests)
            checked.add_metric([label], client.checked)
            outside.add_metric([label], client.outside)
            ratio.add_metric([label], client.volume_ratio)
        yield from (requests, checked, outside, ratio)


class EventsCollector(Collector):
    """The event stream (gateway.background.events): what was emitted and dropped here, the
    deliveries this process made, and each sink's backlog as this process last read it."""

    def __init__(self, events: Events) -> None:
        self.events = events

    def collect(self) -> Iterator[Metric]:
        e = self.events
        emitted = CounterMetricFamily(
            "turnout_events_emitted", "Events handed to the stream, by kind", labels=["kind"]
        )
        for kind in KINDS:
            emitted.add_metric([kind], e.emitted.get(kind, 0))
        yield emitted
        dropped = CounterMetricFamily(
            "turnout_events_dropped",
            "Events dropped before the outbox took them, by reason (outbox_full: the outbox is "
            "full of undelivered events)",
            labels=["reason"],
        )
        for reason in DROP_REASONS:
            dropped.add_metric([reason], e.dropped.get(reason, 0))
        yield dropped
        deliveries = CounterMetricFamily(
            "turnout_event_deliveries",
            "Delivery attempts by this process, by sink and outcome (delivered: 2xx; failed: "
            "error, timeout, 5xx, 408 or 429, retried; rejected: another 4xx; poisoned: skipped "
            "after its rejections)",
            labels=["sink", "outcome"],
        )
        for sink in e.sinks:
            for outcome in OUTCOMES:
                deliveries.add_metric(
                    [sink.name, outcome], e.deliveries.get((sink.name, outcome), 0)
                )
        yield deliveries
        depth = GaugeMetricFamily(
            "turnout_event_outbox_depth",
            "Events in the outbox a sink has not passed yet",
            labels=["sink"],
        )
        age = GaugeMetricFamily(
            "turnout_event_outbox_oldest_age_seconds",
            "Age of the oldest event a sink has not passed yet (0: none)",
            labels=["sink"],
        )
        for sink in e.sinks:
            if sink.name in e.depth:
                depth.add_metric([sink.name], e.depth[sink.name])
                age.add_metric([sink.name], e.oldest_age_s.get(sink.name, 0.0))
        yield depth
        yield age


class QualityCollector(Collector):
    """Quality per version (gateway.background.quality): set ``view`` (accumulators of the
    quality window, fleet-wide) before each collection. Series only for versions loaded here
    (the registry's), metrics only of the quality guards' list; outcome and join counters are
    this process's."""

    def __init__(self, registry: Registry, quality: Quality) -> None:
        self.registry = registry
        self.quality = quality
        self.view: Mapping[tuple[str, str], Accumulator] = {}

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version", "metric"]
        value = GaugeMetricFamily(
            "turnout_quality_value",
            "A realized quality figure over the quality window, from the labels joined to the "
            "version's predictions (fleet-wide: aggregate with min/max, never sum)",
            labels=labels,
        )
        low = GaugeMetricFamily(
            "turnout_quality_lower_bound",
            "The figure's lower 95 % confidence bound (what a min_quality floor is judged on)",
            labels=labels,
        )
        high = GaugeMetricFamily(
            "turnout_quality_upper_bound",
            "The figure's upper 95 % confidence bound (judged for metrics where lower is better)",
            labels=labels,
        )
        estimated = GaugeMetricFamily(
            "turnout_quality_estimated",
            "Binary tasks: the figure estimated from the served scores alone (CBPE)",
            labels=labels,
        )
        labelled = GaugeMetricFamily(
            "turnout_quality_labels",
            "Labelled predictions in the quality window",
            labels=["model", "version"],
        )
        served = GaugeMetricFamily(
            "turnout_quality_served",
            "Binary tasks: served scores in the quality window (the estimate's sample)",
            labels=["model", "version"],
        )
        loaded = {(lv.info.model, lv.info.version) for lv in self.registry.loaded()}
        for key, acc in sorted(self.view.items()):
            if key not in loaded:
                continue
            labelled.add_metric(list(key), acc.labelled)
            for metric, figure in acc.realized().items():
                if metric in QUALITY_METRICS:
                    _add(value, [*key, metric], figure.value)
                    _add(low, [*key, metric], figure.low)
                    _add(high, [*key, metric], figure.high)
            if isinstance(acc, BinaryQuality):
                served.add_metric(list(key), acc.unlabelled)
                for metric, figure in acc.estimated().items():
                    if metric in QUALITY_METRICS:
                        _add(estimated, [*key, metric], figure.value)
        yield from (value, low, high, estimated, labelled, served)
        outcomes = CounterMetricFamily(
            "turnout_outcomes",
            "Outcomes (labels) posted, by result: accepted, duplicate, conflict, unknown, "
            "expired, invalid",
            labels=["model", "result"],
        )
        for (model, result), n in sorted(self.quality.outcomes.items()):
            outcomes.add_metric([model, result], n)
        yield outcomes
        dropped = CounterMetricFamily(
            "turnout_outcome_predictions_dropped",
            "Served predictions not remembered for their outcome: too many waiting for the store",
        )
        dropped.add_metric([], self.quality.dropped)
        unshaped = CounterMetricFamily(
            "turnout_quality_unshaped_responses",
            "Responses of a version with a task whose task output was missing or misshapen",
        )
        unshaped.add_metric([], self.quality.unshaped)
        join = self.quality.join_stats()
        pending = GaugeMetricFamily(
            "turnout_outcome_predictions_pending",
            "Served predictions waiting for the next flush to the outcome join's store",
        )
        pending.add_metric([], join["pending"])
        yield from (dropped, unshaped, pending)
        evictions = CounterMetricFamily(
            "turnout_outcome_join_evictions",
            "Predictions the in-process outcome join let go before their horizon: the entry "
            "cap (entries) or the byte cap (bytes); none with Redis",
            labels=["reason"],
        )
        for reason, n in sorted(join["evictions"].items()):
            evictions.add_metric([reason], n)
        yield evictions
        for name, help_text in (
            ("entries", "Predictions the in-process outcome join holds"),
            ("bytes", "Estimated memory of the in-process outcome join"),
        ):
            if join[name] is not None:
                gauge = GaugeMetricFamily(f"turnout_outcome_join_{name}", help_text)
                gauge.add_metric([], join[name])
                yield gauge


class PredictionLogCollector(Collector):
    """This process's prediction log (gateway.background.predictions)."""

    def __init__(self, log: PredictionLog) -> None:
        self.log = log

    def collect(self) -> Iterator[Metric]:
        log = self.log
        logged = CounterMetricFamily(
            "turnout_predictions_logged", "Prediction records written to the sink", labels=["model"]
        )
        for model, count in sorted(log.logged.items()):
            logged.add_metric([model], count)
        dropped = CounterMetricFamily(
            "turnout_predictions_dropped",
            "Sampled prediction records not logged: the queue was full, or the sink failed",
            labels=["model", "reason"],
        )
        counts = log.dropped()
        for model in sorted({m for m, _ in counts}.union(log.models)):
            for reason in REASONS:
                dropped.add_metric([model, reason], counts.get((model, reason), 0))
        written = CounterMetricFamily(
            "turnout_prediction_log_written_bytes",
            "Bytes the prediction log wrote (compressed file bytes, or HTTP bodies)",
        )
        written.add_metric([], log.written_bytes)
        queued = GaugeMetricFamily(
            "turnout_prediction_log_queue_records", "Records waiting for the writer"
        )
        queued.add_metric([], log.queued)
        queued_bytes = GaugeMetricFamily(
            "turnout_prediction_log_queue_bytes", "Bytes the arrays of waiting records hold"
        )
        queued_bytes.add_metric([], log.queued_bytes)
        yield from (logged, dropped, written, queued, queued_bytes)
