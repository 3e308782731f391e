"""Prometheus metrics: request counters and latency in-process, job gauges read from Redis.

Each app has its own registry (tests build many apps). The job gauges come from a collector that
reads the status store at scrape time, so every web process reports the same numbers no matter
which worker ran the job.
"""

from __future__ import annotations

import logging
import re

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ml_backend.jobs.queue import live_status
from ml_backend.jobs.state import StatusStore

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 100)
_VERSION_NUMBER = re.compile(r"(\d+)\D*$")
# Pre-annotation acceptance is exported for this many newest versions per project.
ACCEPTANCE_VERSIONS = 5


class StatusCollector:
    """Gauges per project from ``StatusStore``; yields only ``redis_up 0`` when Redis is down."""

    def __init__(self, redis):
        self.redis = redis

    def collect(self):
        up = GaugeMetricFamily("mlb_redis_up", "1 when the web process can reach Redis.")
        if self.redis is None:
            up.add_metric([], 0)
            yield up
            return
        try:
            statuses = {
                str(p): live_status(self.redis, p) for p in StatusStore(self.redis).projects()
            }
        except Exception as exc:  # a scrape must never fail because Redis is down
            log.warning("metrics: cannot read job status from Redis: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        families = {
            "val_accuracy": GaugeMetricFamily(
                "mlb_last_val_accuracy",
                "Validation accuracy of the last trained model.",
                labels=["project"],
            ),
            "labels": GaugeMetricFamily(
                "mlb_labels_used", "Labels used by the last trained model.", labels=["project"]
            ),
            "duration": GaugeMetricFamily(
                "mlb_last_job_duration_seconds",
                "Wall time of the last finished job.",
                labels=["project"],
            ),
            "version": GaugeMetricFamily(
                "mlb_model_version_number",
                "N of the served model version resnet18-vN.",
                labels=["project"],
            ),
            "kept": GaugeMetricFamily(
                "mlb_preannotation_kept_ratio",
                "Share of a version's pre-filled choices that annotators kept (newest versions).",
                labels=["project", "version"],
            ),
            "scored": GaugeMetricFamily(
                "mlb_preannotation_scored",
                "Labels submitted on tasks a version had pre-annotated (newest versions).",
                labels=["project", "version"],
            ),
        }
        jobs = GaugeMetricFamily("mlb_jobs", "Training jobs by state.", labels=["state"])
        counts = {"waiting": 0, "running": 0}
        for project, status in statuses.items():
            if status["state"] == "running":
                counts["running"] += 1
            if status["state"] == "waiting" or status.get("waiting"):
                counts["waiting"] += 1
            _project_gauges(families, project, status)
        for state, count in counts.items():
            jobs.add_metric([state], count)
        yield jobs
        yield from families.values()


def _project_gauges(families: dict, project: str, status: dict) -> None:
    last = status.get("last_job") or {}
    trained = last if last.get("outcome") != "failed" else {}
    metrics = trained.get("metrics") or {}
    value = metrics.get("val_accuracy")
    if isinstance(value, (int, float)):
        families["val_accuracy"].add_metric([project], value)
    labels = metrics.get("labels_used")
    if labels is None and isinstance(metrics.get("train_size"), (int, float)):
        labels = metrics["train_size"] + (metrics.get("val_size") or 0)
    if isinstance(labels, (int, float)):
        families["labels"].add_metric([project], labels)
    if isinstance(last.get("duration_s"), (int, float)):
        families["duration"].add_metric([project], last["duration_s"])
    match = _VERSION_NUMBER.search(status.get("model_version") or "")
    if match:
        families["version"].add_metric([project], int(match.group(1)))
    acceptance = status.get("acceptance") or {}
    newest = sorted(acceptance, key=_number, reverse=True)[:ACCEPTANCE_VERSIONS]
    for version in newest:
        counts = acceptance[version]
        families["scored"].add_metric([project, version], counts.get("n", 0))
        if isinstance(counts.get("rate"), (int, float)):
            families["kept"].add_metric([project, version], counts["rate"])


def _number(version: str) -> int:
    match = _VERSION_NUMBER.search(version)
    return int(match.group(1)) if match else -1


class Metrics:
    """The app's registry and its request metrics."""

    def __init__(self, redis):
        self.registry = CollectorRegistry()
        self.webhooks = Counter(
            "mlb_webhooks",
            "Webhooks received, by action and outcome.",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mlb_request_duration_seconds",
            "Time to answer a request, by route.",
            ["endpoint", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(StatusCollector(redis))
