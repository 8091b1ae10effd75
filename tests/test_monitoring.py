"""The shipped Grafana dashboard and Prometheus alerts use only metrics the worker and the producer export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import sam3_batch.producer.metrics  # registers the producer's metrics
import sam3_batch.worker.metrics  # noqa: F401 - registers the worker's metrics

MONITORING = Path(__file__).resolve().parents[1] / "infra" / "monitoring"
METRIC_NAME = re.compile(r"\bsam3_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}


def exported_names() -> set[str]:
    """Every sample name the worker's and the producer's registries can expose."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("sam3_"):
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict[str, str]]:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_every_metric_in_the_dashboard_is_exported_by_the_worker_or_producer() -> None:
    used = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 10 and used <= exported_names(), used - exported_names()


def test_every_metric_in_the_alert_rules_is_exported_by_the_worker_or_producer() -> None:
    rules = alert_rules()
    used = {name for rule in rules for name in METRIC_NAME.findall(rule["expr"])}
    assert used and used <= exported_names(), used - exported_names()
    assert {"Sam3JobStalled", "Sam3ImageFailureRateHigh", "Sam3QueueNotDraining", "Sam3ProducerStalled"} <= {
        r["alert"] for r in rules}
    assert all(rule["for"] and rule["annotations"]["summary"] for rule in rules)


def test_metric_names_follow_prometheus_conventions() -> None:
    for family in REGISTRY.collect():
        if not family.name.startswith("sam3_"):
            continue
        assert not family.name.endswith("_size"), family.name  # a unit, not "size"
        if family.type == "gauge" and "bytes" in family.name:
            assert family.name.endswith("_bytes"), family.name


def test_the_dashboard_shows_the_producer_and_bytes_written() -> None:
    used = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    producer = {name for name in exported_names() if name.startswith("sam3_producer_")}
    assert producer and producer <= used, producer - used  # every producer metric has a panel
    assert "sam3_written_bytes_total" in used
