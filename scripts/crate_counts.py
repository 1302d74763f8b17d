#!/usr/bin/env python3
"""The crates each build of loopwatch compiles, checked against the README's table.

Counts the distinct packages (name and version) in `cargo tree -e normal` for x86_64 Linux,
loopwatch itself left out, for each row of the README's "Crates compiled" table, and fails if
a row is stale or the default build is over its budget (issue: lean defaults, <= 60).
"""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 60
# README row label -> cargo tree arguments.
BUILDS = {
    "default features": [],
    "`default-features = false`": ["--no-default-features"],
    "`features = [\"otlp\"]`": ["--features", "otlp"],
    "`features = [\"otlp-tls\"]`": ["--features", "otlp-tls"],
    "`features = [\"axum\"]`": ["--features", "axum"],
}


def count(args):
    out = subprocess.run(
        ["cargo", "tree", "-e", "normal", "--target", "x86_64-unknown-linux-gnu",
         "--prefix", "none", *args],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    pkgs = set()
    for line in out.splitlines():
        line = line.replace(" (*)", "").replace(" (proc-macro)", "").strip()
        if not line:
            continue
        name, version = line.split()[:2]
        if name != "loopwatch":
            pkgs.add((name, version))
    return len(pkgs)


def main():
    readme = (ROOT / "README.md").read_text()
    stated = {}
    for label in BUILDS:
        m = re.search(r"^\| " + re.escape(label) + r" \| (\d+) \|", readme, re.M)
        if not m:
            sys.exit(f"README.md has no crate-count row for {label}")
        stated[label] = int(m.group(1))
    bad = []
    for label, args in BUILDS.items():
        n = count(args)
        print(f"{label}: {n} crates (README says {stated[label]})")
        if n != stated[label]:
            bad.append(f"{label}: {n}, README says {stated[label]}")
    default = count([])
    if default > BUDGET:
        bad.append(f"the default build compiles {default} crates, over the budget of {BUDGET}")
    if bad:
        sys.exit("crate counts: " + "; ".join(bad))
    print(f"crate counts match the README; the default build is within {BUDGET}")


if __name__ == "__main__":
    main()
