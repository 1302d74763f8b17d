#!/usr/bin/env python3
"""A newcomer's walk-through, from the README alone: an axum service on stable tokio.

Builds a new cargo project whose dependency line and `main.rs` are the README's own ("An axum
service on stable tokio", taken from README.md as it is, not a copy kept here), with the two
handlers it routes to: `/report` blocks its worker (`std::thread::sleep`, as a synchronous
client in async code does) and `/users/{id}` answers at once. Runs it on loopback, sends it
requests, and asserts what the README promises a newcomer:
  - a stall report in the service's log, one short line, naming the route, the cause and the
    hint;
  - a real Prometheus server scraping the service's /metrics, with loopwatch's alert rules
    loaded, shows `LoopwatchWorkerStalled` firing while the handler holds its worker.

Usage: scripts/newcomer.py   (needs cargo, and Debian's prometheus)
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prometheus_e2e import (  # noqa: E402
    ROOT, free_port, get, print_logs, query, start_prometheus, stop_all, wait_for,
)

WORK = os.path.join(ROOT, "target", "newcomer")
SECTION = "### An axum service on stable tokio"

HANDLERS = r'''
// The handlers the README's router names (the newcomer's own code).
async fn report() -> &'static str {
    // A synchronous call in async code: it holds the worker for 2.5 s.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    "report\n"
}

async fn user(axum::extract::Path(id): axum::extract::Path<u32>) -> String {
    format!("user {id}\n")
}
'''


def readme_section():
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(SECTION)
    # The next heading of its level or above (a `#[tokio::main]` line in its code is none).
    ends = [text.find(h, start + len(SECTION)) for h in ("\n## ", "\n### ")]
    end = min((e for e in ends if e >= 0), default=len(text))
    section = text[start:end]
    toml = re.search(r"```toml\n(.*?)```", section, re.S).group(1).strip()
    rust = re.search(r"```rust[^\n]*\n(.*?)```", section, re.S).group(1)
    return toml, rust


def project():
    toml, rust = readme_section()
    if not toml.startswith("loopwatch = {") or 'version = "0.1"' not in toml:
        sys.exit(f"the README's dependency line changed: {toml}")
    dep = toml.replace('version = "0.1"', f'path = "{ROOT}"')
    # Every port on loopback: the README's 0.0.0.0:3000 becomes the address given.
    if '"0.0.0.0:3000"' not in rust:
        sys.exit("the README's example no longer binds 0.0.0.0:3000")
    main_rs = rust.replace('"0.0.0.0:3000"', '&std::env::var("NEWCOMER_ADDR").unwrap()')
    os.makedirs(os.path.join(WORK, "src"), exist_ok=True)
    with open(os.path.join(WORK, "Cargo.toml"), "w") as f:
        f.write(
            '[package]\nname = "newcomer"\nversion = "0.0.0"\nedition = "2021"\npublish = false\n\n'
            "[dependencies]\n"
            f"{dep}\n"
            'axum = "0.8"\n'
            'tokio = { version = "1", features = ["full"] }\n'
            'tracing-subscriber = "0.3"\n\n'
            "[workspace]\n"
        )
    with open(os.path.join(WORK, "src", "main.rs"), "w") as f:
        f.write(main_rs + HANDLERS)
    # The versions loopwatch is tested with (cargo adds what this project needs besides).
    shutil.copy(os.path.join(ROOT, "Cargo.lock"), os.path.join(WORK, "Cargo.lock"))


def main():
    for tool in ("cargo", "prometheus"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    project()
    target = os.path.join(ROOT, "target")
    subprocess.run(
        ["cargo", "build", "-q", "--manifest-path", os.path.join(WORK, "Cargo.toml")],
        env=dict(os.environ, CARGO_TARGET_DIR=target),
        check=True,
    )
    binary = os.path.join(target, "debug", "newcomer")
    addr = f"127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    prom = f"127.0.0.1:{free_port()}"
    work = tempfile.mkdtemp(prefix="loopwatch-newcomer-")
    procs = []
    log_path = os.path.join(work, "service.log")
    stop = threading.Event()
    try:
        procs.append(start_prometheus(work, "newcomer", metrics, prom))
        # NO_COLOR: tracing-subscriber's default features colour even a redirected log.
        env = dict(os.environ, NEWCOMER_ADDR=addr, LOOPWATCH_PROMETHEUS_ADDR=metrics, NO_COLOR="1")
        env.pop("RUST_LOG", None)
        log = open(log_path, "w")
        procs.append(subprocess.Popen([binary], env=env, stdout=log, stderr=subprocess.STDOUT))
        wait_for("the service to answer", lambda: get(f"http://{addr}/users/7") == "user 7\n", 30)

        def load():
            while not stop.is_set():
                try:
                    get(f"http://{addr}/report", timeout=10)
                except OSError:
                    time.sleep(0.1)

        threading.Thread(target=load, daemon=True).start()

        def report_line():
            with open(log_path) as f:
                return [
                    line.rstrip("\n")
                    for line in f
                    if " WARN loopwatch: stall " in line and "task GET /report" in line
                ]

        lines = wait_for("a stall report for GET /report in the log", report_line, 30)
        print(f"the service's log: {lines[0]}")
        for line in lines:
            assert "cause: syscall(clock_nanosleep)" in line, line
            assert "hint: std::thread::sleep: use tokio::time::sleep" in line, line
            # One short line: the fields are for JSON logs, not for this one.
            assert len(line) <= 300 and "stall.id=" not in line, line
        firing = wait_for(
            "LoopwatchWorkerStalled firing in Prometheus",
            lambda: query(prom, 'ALERTS{alertname="LoopwatchWorkerStalled", alertstate="firing"}'),
            60,
        )
        labels = firing[0][0]
        assert labels.get("job") == "newcomer" and labels.get("severity") == "warning", labels
        print(f"alert firing: {labels}")
        kinds = {m.get("kind") for m, _ in query(prom, "loopwatch_stalls_total")}
        assert "GET /report" in kinds, kinds
        print("newcomer walk-through: ok")
    except BaseException:
        print_logs(work, "service.log", "prometheus.log")
        raise
    finally:
        stop.set()
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
