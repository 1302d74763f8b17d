#!/usr/bin/env python3
"""A real Prometheus server scrapes loopwatch's demo while it stalls.

Starts the demo (its /metrics on a free loopback port, one 5 s stall a third of the way in) and
Debian's `prometheus` (scraping it every second, also on loopback), then asserts over
Prometheus' HTTP API:
  - every panel of dashboards/loopwatch.json shows data;
  - the in-progress gauge is 1 while the long stall runs (so an alert can fire before it ends);
  - the stall counters by cause, after it;
  - histogram_quantile over the poll and stall duration histograms;
  - the runtime's own figures (tokio-metrics) under the same prefix;
and that `promtool check metrics` accepts a scrape taken mid-stall. The server loads
exporters/prometheus/*.yml: the LoopwatchWorkerStalled alert must fire while the long stall
runs. Every query of dashboards/loopwatch.json must run, and the main panels return data.

Usage: scripts/prometheus_e2e.py path/to/demo-binary
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def query(prom, q):
    """An instant PromQL query: list of (labels, value)."""
    url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    body = json.loads(get(url))
    if body.get("status") != "success":
        raise RuntimeError(f"query {q!r} failed: {body}")
    return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]


def wait_for(what, fn, timeout):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # the server may not answer yet
            last = e
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def start_prometheus(work, job, target, prom):
    """Debian's prometheus on `prom`, scraping `target` every second, with loopwatch's rules
    and alerts loaded (evaluated every second); returns once it is ready."""
    with open(os.path.join(work, "prometheus.yml"), "w") as f:
        f.write(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "rule_files:\n"
            f"  - {ROOT}/exporters/prometheus/loopwatch-rules.yml\n"
            f"  - {ROOT}/exporters/prometheus/loopwatch-alerts.yml\n"
            f"scrape_configs:\n  - job_name: {job}\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
    prom_log = open(os.path.join(work, "prometheus.log"), "w")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={work}/prometheus.yml",
            f"--storage.tsdb.path={work}/data",
            f"--web.listen-address={prom}",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for("prometheus to be ready", lambda: "Ready" in get(f"http://{prom}/-/ready"), 60)
    except BaseException:
        proc.kill()
        raise
    return proc


def stop_all(procs):
    """Kills and reaps each process still running."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def print_logs(work, *names):
    """The last lines of each log in `work`, to stderr (a failed run says why)."""
    for name in names:
        path = os.path.join(work, name)
        if os.path.exists(path):
            print(f"--- {name} (last 40 lines)", file=sys.stderr)
            with open(path) as f:
                print("".join(f.readlines()[-40:]), file=sys.stderr)


def dashboard_queries():
    with open(os.path.join(ROOT, "dashboards", "loopwatch.json")) as f:
        dash = json.load(f)
    for p in dash["panels"]:
        for t in p.get("targets", []):
            q = (
                t["expr"]
                .replace("$job", ".*")
                .replace("$instance", ".*")
                .replace("$__rate_interval", "30s")
            )
            yield p["title"], q


def main():
    demo = sys.argv[1]
    for tool in ("prometheus", "promtool"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install -y prometheus")
    metrics_port, prom_port = free_port(), free_port()
    metrics = f"127.0.0.1:{metrics_port}"
    prom = f"127.0.0.1:{prom_port}"
    work = tempfile.mkdtemp(prefix="loopwatch-prom-")
    procs = []
    try:
        procs.append(start_prometheus(work, "loopwatch-demo", metrics, prom))

        env = dict(
            os.environ,
            LOOPWATCH_PROMETHEUS_ADDR=metrics,
            DEMO_SECS="24",
            DEMO_FREEZE_MS="5000",
            RUST_LOG="warn",
        )
        demo_log = open(os.path.join(work, "demo.log"), "w")
        procs.append(
            subprocess.Popen([demo], env=env, stdout=demo_log, stderr=subprocess.STDOUT)
        )
        started = time.monotonic()

        # While the 5 s stall runs (from 8 s): the gauge is 1, scraped by the real server.
        # (The demo's 50 ms stalls can be in progress at a scrape too: the age tells the long
        # one apart.)
        running = wait_for(
            "the long stall in progress in Prometheus",
            lambda: query(
                prom,
                'loopwatch_stalls_in_progress{layer="async"} >= 1 and on(instance) '
                'loopwatch_oldest_stall_age_seconds{layer="async"} > 1',
            ),
            40,
        )
        print(f"long stall in progress at {time.monotonic() - started:.1f}s: {running}")
        # The alert fires while the stall still runs.
        firing = wait_for(
            "LoopwatchWorkerStalled firing",
            lambda: query(prom, 'ALERTS{alertname="LoopwatchWorkerStalled", alertstate="firing"}'),
            10,
        )
        print(f"alert firing: {firing[0][0]}")
        # promtool on a scrape taken mid-stall.
        scrape = get(f"http://{metrics}/metrics")
        assert "loopwatch_stalls_in_progress" in scrape
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True
        )
        print(f"promtool check metrics: exit {check.returncode} {check.stdout}{check.stderr}")
        assert check.returncode == 0, "promtool check metrics failed"

        # After it: no stall has run for a second any more (the demo's 50 ms stalls go on, so
        # the in-progress gauge itself is rarely 0 at a scrape), and the histogram holds one
        # stall longer than 2.5 s.
        wait_for(
            "the long stall to end in Prometheus",
            lambda: query(
                prom,
                'max(loopwatch_oldest_stall_age_seconds{layer="async"}) < 1 and on() '
                '(sum(loopwatch_stall_duration_seconds_bucket{le="+Inf"}) '
                '- sum(loopwatch_stall_duration_seconds_bucket{le="2.5"})) >= 1',
            ),
            15,
        )
        by_cause = {m.get("cause"): v for m, v in query(prom, "sum by (cause) (loopwatch_stalls_total)")}
        print(f"stalls by cause: {by_cause}")
        assert by_cause.get("cpu", 0) >= 1, by_cause
        assert by_cause.get("syscall", 0) >= 1, by_cause
        kinds = {m.get("kind") for m, _ in query(prom, "loopwatch_stalls_total")}
        assert "rebuild_cache" in kinds or "http-connection" in kinds, kinds

        p99 = query(
            prom,
            "histogram_quantile(0.99, sum by (le) (rate(loopwatch_poll_duration_seconds_bucket[1m])))",
        )
        print(f"poll p99: {p99}")
        assert p99 and 0 < p99[0][1] <= 10, p99
        worst = query(
            prom,
            "histogram_quantile(1, sum by (le) (loopwatch_stall_duration_seconds_bucket))",
        )
        print(f"worst stall bucket: {worst}")
        assert worst and worst[0][1] >= 5, worst

        workers = query(prom, 'loopwatch_runtime_workers{runtime="demo"}')
        assert workers and workers[0][1] == 2, workers
        busy = query(prom, 'loopwatch_runtime_worker_busy_ratio{runtime="demo"}')
        assert len(busy) == 2, busy
        polls = query(prom, "rate(loopwatch_polls_total[30s]) > 0")
        assert polls, "no poll rate"

        # The dashboard's queries all run, and every panel shows data: at least one of its
        # queries returns a series. (A single query may be empty where what it shows is off in
        # the demo: OTLP drops with no OTLP, CPU-pool jobs with no pool, the queues that need
        # --cfg tokio_unstable; each panel has another query that is not.)
        with_data, empty = set(), []
        titles = set()
        for title, q in dashboard_queries():
            titles.add(title)
            if query(prom, q):
                with_data.add(title)
            else:
                empty.append(f"{title}: {q}")
        for e in empty:
            print(f"empty query (another of its panel has data): {e}")
        no_data = titles - with_data
        assert not no_data, f"dashboard panels with no data at all: {sorted(no_data)}"
        print("dashboard queries: ok")
        rules = json.loads(get(f"http://{prom}/api/v1/rules"))["data"]["groups"]
        health = {r["name"]: r["health"] for g in rules for r in g["rules"]}
        # ("unknown": a group with a 30 s interval not evaluated yet; "err" would be a bad rule.)
        assert all(h in ("ok", "unknown") for h in health.values()), health
        assert health.get("LoopwatchWorkerStalled") == "ok", health
        print(f"rules loaded, none in error: {len(health)}")

        rc = procs[1].wait(timeout=60)
        assert rc == 0, f"demo exited with {rc}"
        print("prometheus e2e: ok")
    except BaseException:
        print_logs(work, "demo.log", "prometheus.log")
        raise
    finally:
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
