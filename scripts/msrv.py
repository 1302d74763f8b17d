#!/usr/bin/env python3
"""The crate's `rust-version` must be at least every locked dependency's own.

For each supported target and for the default and full feature sets, the packages the library
builds (`cargo tree -e normal`, which evaluates target cfgs) are looked up in `cargo metadata`
for their declared `rust-version`; the highest is what the committed lock needs. Cargo.toml's
`rust-version` must not claim less. (Only one toolchain is installable on the project's
machines, so no older compiler builds it here: the claim rests on the dependencies'
declarations and on the crate's own code, built in CI with the current toolchain.)
"""

import json
import re
import subprocess
import sys

TARGETS = ["x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu", "x86_64-apple-darwin",
           "x86_64-pc-windows-gnu"]
FEATURE_SETS = [[], ["--all-features"], ["--no-default-features"]]


def version_key(v):
    parts = [int(x) for x in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--all-features"], text=True))
    declared = {(p["name"], p["version"]): p.get("rust_version") for p in meta["packages"]}
    root = next(p for p in meta["packages"] if p["id"] == meta["resolve"]["root"])
    claim = root.get("rust_version")
    if not claim:
        sys.exit("Cargo.toml declares no rust-version")
    worst = ("0", None, None)
    for target in TARGETS:
        for features in FEATURE_SETS:
            out = subprocess.check_output(
                ["cargo", "tree", "--locked", "-e", "normal", "--target", target, "--prefix",
                 "none", "--format", "{p}", *features], text=True)
            for line in out.splitlines():
                m = re.match(r"(\S+) v(\S+)", line)
                if not m or m.group(1) == root["name"]:
                    continue
                rv = declared.get((m.group(1), m.group(2)))
                if rv and version_key(rv) > version_key(worst[0]):
                    worst = (rv, f"{m.group(1)} {m.group(2)}", f"{target} {' '.join(features) or 'default features'}")
    print(f"rust-version {claim}; the locked dependencies need {worst[0]} ({worst[1]}, {worst[2]})")
    if version_key(claim) < version_key(worst[0]):
        sys.exit(f"Cargo.toml claims rust-version {claim}, but {worst[1]} needs {worst[0]}")


if __name__ == "__main__":
    main()
