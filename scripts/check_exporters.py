#!/usr/bin/env python3
"""Static checks of what operators deploy beside the crate (exporters/, dashboards/).

No OpenTelemetry Collector binary can be installed on these machines, so the Collector config
is checked for structure only: every component a pipeline names is defined, the receivers
listen for OTLP on gRPC and HTTP, metrics keep loopwatch's names. Every `loopwatch_*` metric
named in a rule file or dashboard must exist in the metric table (src/export/table.rs); the
rules themselves are checked and unit-tested with promtool by scripts/test.sh.
"""

import glob
import json
import re
import sys

import yaml

ROOT = sys.argv[1] if len(sys.argv) > 1 else "."


def table_names():
    src = open(f"{ROOT}/src/export/table.rs").read()
    names = set(re.findall(r'= "(loopwatch_[a-z0-9_]+)"', src))
    assert len(names) > 20, names
    return names


def referenced(text, names):
    """loopwatch_* names used in text, with histogram suffixes folded back."""
    bad = set()
    for n in set(re.findall(r"loopwatch_[a-z0-9_]+", text)):
        base = re.sub(r"_(bucket|sum|count)$", "", n)
        if n not in names and base not in names:
            bad.add(n)
    return bad


def check_collector():
    path = f"{ROOT}/exporters/otel-collector/config.yaml"
    cfg = yaml.safe_load(open(path))
    protocols = cfg["receivers"]["otlp"]["protocols"]
    assert "grpc" in protocols and "http" in protocols, protocols
    assert cfg["exporters"]["prometheus"]["add_metric_suffixes"] is False
    for name, pipe in cfg["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in pipe.get(kind, []):
                assert comp in cfg.get(kind, {}), f"{path}: pipeline {name} uses undefined {kind[:-1]} {comp}"
    assert {"traces", "metrics"} <= set(cfg["service"]["pipelines"]), "needs traces and metrics"
    print(f"{path}: ok")


def check_references():
    names = table_names()
    files = (
        glob.glob(f"{ROOT}/exporters/**/*.yml", recursive=True)
        + glob.glob(f"{ROOT}/exporters/**/*.yaml", recursive=True)
        + glob.glob(f"{ROOT}/dashboards/*.json")
    )
    for f in files:
        text = open(f).read()
        if f.endswith(".json"):
            json.loads(text)
        bad = referenced(text, names) - recorded_names(text)
        assert not bad, f"{f}: unknown metrics {sorted(bad)}"
        print(f"{f}: ok")


def recorded_names(text):
    """Series defined by recording rules (`record: loopwatch:...` uses a colon, so none)."""
    return set(re.findall(r"record:\s*(loopwatch_[a-z0-9_]+)", text))


def check_alerts():
    """Every alert has a severity, a summary, a description and a runbook, and a promtool test
    (its name in the test file's alert_rule_test)."""
    path = f"{ROOT}/exporters/prometheus/loopwatch-alerts.yml"
    tests = yaml.safe_load(open(f"{ROOT}/exporters/prometheus/tests/loopwatch.test.yml"))
    tested = {
        t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])
    }
    for group in yaml.safe_load(open(path))["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert")
            if not name:
                continue
            assert rule.get("labels", {}).get("severity") in ("critical", "warning", "info"), name
            for a in ("summary", "description", "runbook"):
                assert rule.get("annotations", {}).get(a), f"{path}: {name} has no {a}"
            assert name in tested, f"{path}: {name} has no promtool test"
    print(f"{path}: every alert has a severity, a runbook and a test")


check_collector()
check_references()
check_alerts()
