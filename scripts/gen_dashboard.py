#!/usr/bin/env python3
"""Writes dashboards/loopwatch.json, loopwatch's Grafana dashboard (edit here, then run it).

Rows: the stall right now (in progress, age); what stalls and why (rate by cause, by task
kind, time stalled, duration quantiles per layer, short polls' time asleep); who waited
(victims, loop lag, schedule delay); the blocking pool and CPU pools; poll durations per
layer; the runtime (busy ratio per worker, queue depth); loopwatch's own health (drops,
overflow). Every query uses the metric table's names,
so it works on loopwatch's own /metrics and through the OTel Collector's Prometheus exporter.
"""

import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'

panels = []
next_id = 1
y = 0


def row(title):
    global next_id, y
    panels.append({"type": "row", "title": title, "id": next_id, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    next_id += 1
    y += 1


def panel(kind, title, targets, x, w, h=8, unit=None, description="", extra=None):
    global next_id
    p = {
        "type": kind,
        "title": title,
        "id": next_id,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "targets": [
            dict({"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": l}, **({"instant": True, "format": "table"} if kind == "table" else {}))
            for i, (e, l) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
        "options": {},
    }
    if extra:
        p.update(extra)
    panels.append(p)
    next_id += 1


row("Stalls right now")
panel("stat", "Stalls in progress", [(f'sum(loopwatch_stalls_in_progress{{{SEL}, layer="async"}})', "async")], 0, 6, 6,
      description="Polls holding an async worker past the threshold at this moment. Non-zero = a worker is stuck now.",
      extra={"fieldConfig": {"defaults": {"thresholds": {"mode": "absolute", "steps": [
          {"color": "green", "value": None}, {"color": "red", "value": 1}]}}, "overrides": []}})
panel("timeseries", "Oldest running stall", [(f'max by (instance, layer) (loopwatch_oldest_stall_age_seconds{{{SEL}}})', "{{instance}} {{layer}}")], 6, 18, 6, unit="s",
      description="How long the oldest running stall has held its worker (0 when none runs).")
y += 6

row("What stalls, and why")
panel("timeseries", "Stalls per second by cause", [(f'sum by (cause, syscall) (rate(loopwatch_stalls_total{{{SEL}}}[$__rate_interval]))', "{{cause}} {{syscall}}")], 0, 12, unit="ops",
      description="cpu: computing on the worker; syscall: blocked in that system call; starved: the host gave the thread no CPU; throttled: the container's CPU quota ran out.")
panel("timeseries", "Time stalled (share of one worker)", [(f'sum by (layer) (rate(loopwatch_stall_duration_seconds_sum{{{SEL}}}[$__rate_interval]))', "{{layer}}")], 12, 12, unit="percentunit",
      description="Seconds of worker time held by stalled polls, per second.")
y += 8
panel("table", "Top stalling task kinds (last hour)", [(f'topk(10, sum by (kind, cause) (increase(loopwatch_stalls_total{{{SEL}}}[1h])))', "")], 0, 12,
      description="The task (its name or spawn site) whose polls stalled most, and why.")
panel("timeseries", "Stall duration p50 / p99 by layer", [
    (f'histogram_quantile(0.5, sum by (layer, le) (rate(loopwatch_stall_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p50 {{layer}}"),
    (f'histogram_quantile(0.99, sum by (layer, le) (rate(loopwatch_stall_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p99 {{layer}}")], 12, 12, unit="s",
      description="Per layer: the async, blocking and CPU thresholds differ by orders of magnitude, so one quantile over all of them would mean nothing.")
y += 8
panel("timeseries", "Short polls: time asleep in calls (thousand cuts)", [
    (f'topk(10, sum by (kind, syscall) (rate(loopwatch_blocked_seconds_total{{{SEL}, layer="async"}}[$__rate_interval])))', "{{kind}} asleep in {{syscall}}"),
    (f'topk(5, sum by (kind) (rate(loopwatch_running_seconds_total{{{SEL}, layer="async"}}[$__rate_interval])))', "{{kind}} running")], 0, 24, unit="percentunit",
      description="Share of one async worker that polls under the threshold spent asleep in each system call (and running), sampled. "
                  "Many short blocking calls (std::thread::sleep, std::net, a std Mutex) cut throughput with no stall: a kind above 10 % asleep is the LoopwatchThousandCuts alert.")
y += 8

row("Who waited")
panel("timeseries", "Victims per second", [(f'sum by (layer, cause) (rate(loopwatch_victims_total{{{SEL}}}[$__rate_interval]))', "{{layer}} {{cause}}")], 0, 12, unit="ops",
      description="Tasks that waited behind a stall on its worker (head-of-line victims), by the stall's cause (poll hooks under tokio_unstable, or watched futures).")
panel("timeseries", "Victim wait p99", [(f'histogram_quantile(0.99, sum by (layer, le) (rate(loopwatch_victim_wait_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p99 {{layer}}")], 12, 12, unit="s",
      description="How long a victim waited behind its stall.")
y += 8
panel("timeseries", "Loop lag p99 by runtime", [(f'histogram_quantile(0.99, sum by (runtime, le) (rate(loopwatch_loop_lag_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p99 {{runtime}}")], 0, 12, unit="s",
      description="A heartbeat task's wait from spawn to first poll (every 25 ms, runtimes given to monitor_runtime): what a task woken now waits for a worker. Stays near 0 while one is free.")
panel("timeseries", "Schedule delay p99, top kinds", [(f'topk(5, histogram_quantile(0.99, sum by (kind, le) (rate(loopwatch_schedule_delay_seconds_bucket{{{SEL}}}[$__rate_interval]))))', "p99 {{kind}}")], 12, 12, unit="s",
      description="Wake to poll, for timed polls (tokio_unstable poll hooks with schedule latency, or watched futures).")
y += 8

row("Blocking pool and CPU pools")
panel("timeseries", "Blocking pool", [
    (f'max(loopwatch_blocking_pool_saturation{{{SEL}}})', "saturation"),
    (f'sum(loopwatch_blocking_jobs_running{{{SEL}}})', "running"),
    (f'sum(loopwatch_blocking_jobs_queued{{{SEL}}})', "queued")], 0, 12,
      description="loopwatch::spawn_blocking jobs: running, waiting for a thread, and the pool's saturation (1 = every thread busy). Queued with saturation 1 is the LoopwatchBlockingPoolSaturated alert.")
panel("timeseries", "Blocking slow starts and CPU-pool jobs", [
    (f'sum(rate(loopwatch_blocking_slow_starts_total{{{SEL}}}[$__rate_interval]))', "blocking jobs that waited past the threshold"),
    (f'sum by (pool) (rate(loopwatch_cpu_jobs_total{{{SEL}}}[$__rate_interval]))', "{{pool}} jobs"),
    (f'sum by (pool) (rate(loopwatch_cpu_jobs_too_fine_total{{{SEL}}}[$__rate_interval]))', "{{pool}} jobs under 50 µs")], 12, 12, unit="ops",
      description="CPU pools made with Guard::cpu_pool (feature rayon): jobs under 50 µs cost more to dispatch than they gain.")
y += 8

row("Polls")
panel("timeseries", "Poll duration p99 by layer", [(f'histogram_quantile(0.99, sum by (layer, le) (rate(loopwatch_poll_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p99 {{layer}}")], 0, 12, unit="s",
      description="From the timed polls (one in sample_every per thread).")
panel("timeseries", "Polls per second, slow polls per second", [
    (f'sum(rate(loopwatch_polls_total{{{SEL}}}[$__rate_interval]))', "polls"),
    (f'sum(rate(loopwatch_slow_polls_total{{{SEL}}}[$__rate_interval]))', "slow polls")], 12, 12, unit="ops")
y += 8

row("Runtime")
panel("timeseries", "Worker busy ratio", [(f'loopwatch_runtime_worker_busy_ratio{{{SEL}}}', "{{runtime}} worker {{worker}}")], 0, 12, unit="percentunit",
      description="Share of the last export interval each worker was busy (0..1; a worker held by a stall, which neither parks nor wakes, reads 1). One worker pinned at 100 % while the others idle is a stall's signature; all of them near 100 % is load.")
panel("timeseries", "Queues", [
    (f'sum by (runtime) (loopwatch_runtime_global_queue_depth{{{SEL}}})', "global {{runtime}}"),
    (f'sum by (runtime) (loopwatch_runtime_local_queue_depth{{{SEL}}})', "local {{runtime}}"),
    (f'sum by (runtime) (loopwatch_runtime_blocking_queue_depth{{{SEL}}})', "blocking {{runtime}}")], 12, 12,
      description="Tasks waiting (local and blocking queues need --cfg tokio_unstable).")
y += 8

row("loopwatch itself")
panel("timeseries", "Dropped and overflowed", [
    (f'sum(rate(loopwatch_dropped_reports_total{{{SEL}}}[$__rate_interval]))', "reports"),
    (f'sum(rate(loopwatch_dropped_samples_total{{{SEL}}}[$__rate_interval]))', "samples"),
    (f'sum by (signal) (rate(loopwatch_export_dropped_total{{{SEL}}}[$__rate_interval]))', "otlp {{signal}}"),
    (f'sum(rate(loopwatch_label_overflow_total{{{SEL}}}[$__rate_interval]))', "kinds as other")], 0, 12, unit="ops",
      description="What loopwatch's bounded queues and tables dropped (the service is never held).")
panel("timeseries", "Stack captures", [(f'sum by (status) (rate(loopwatch_stacks_total{{{SEL}}}[$__rate_interval]))', "{{status}}")], 12, 12, unit="ops")
y += 8


def var(name, query):
    return {"name": name, "label": name, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name},
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


dashboard = {
    "title": "loopwatch: tokio stalls",
    "uid": "loopwatch",
    "description": "Polls that monopolize tokio workers, why, and what they cost (loopwatch).",
    "tags": ["loopwatch", "tokio", "rust"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "hide": 0},
        var("job", "label_values(loopwatch_polls_total, job)"),
        var("instance", 'label_values(loopwatch_polls_total{job=~"$job"}, instance)'),
    ]},
    "annotations": {"list": []},
    "panels": panels,
}

out = os.path.join(os.path.dirname(__file__), "..", "dashboards", "loopwatch.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
print(f"wrote {os.path.relpath(out, os.path.join(os.path.dirname(__file__), '..'))}: {len(panels)} panels")
