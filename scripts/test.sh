#!/usr/bin/env bash
# The whole test suite, on a fresh machine: formatting, lints, docs, the tests in both builds
# (stable tokio, and RUSTFLAGS="--cfg tokio_unstable"), the demo, and a smoke run of the bench.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

# `capture CMD...`: runs CMD, keeps what it printed in $raw_out, colour codes stripped in $out; if CMD
# fails, prints the end of that output and stops, so a failed run says why.
capture() {
  local rc=0
  raw_out=$("$@" 2>&1) || rc=$?
  out=$(sed 's/\x1b\[[0-9;]*m//g' <<<"$raw_out")
  if [ "$rc" -ne 0 ]; then
    tail -n 80 <<<"$out" >&2
    echo "failed (exit $rc): $*" >&2
    exit "$rc"
  fi
}
# `example [CARGO-ENV...] -- ARGS...`: builds an example first (a slow build must not count
# against the run's timeout), then runs it under `timeout`, output in $out.
example() {
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  capture "${envs[@]}" cargo build -q "$@"
  capture "${envs[@]}" timeout 120 cargo run -q "$@"
}

if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
# rustfmt and clippy come with rustup's default profile; add them if this toolchain lacks them.
for c in rustfmt clippy; do
  if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$c"
  fi
done

export CARGO_TERM_COLOR=never
log=$(mktemp)
trap 'rm -f "$log"' EXIT
unstable_env=(env RUSTFLAGS="--cfg tokio_unstable" RUSTDOCFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=target/unstable)

step "cargo fmt --check"
cargo fmt --all -- --check

step "the package: rust-version covers the locked dependencies; contributor files not shipped"
python3 scripts/msrv.py
if cargo package --list --allow-dirty --offline | grep -E '^(\.ci|scripts)/'; then
  echo "the package ships contributor files" >&2
  exit 1
fi

step "crates compiled per build, as the README states (default build within its budget)"
python3 scripts/crate_counts.py

step "no two files in src/ depend on each other (ARCHITECTURE.md, code map)"
python3 scripts/module_cycles.py

step "clippy (stable tokio)"
cargo clippy --all-targets --all-features -- -D warnings

step "clippy (--cfg tokio_unstable)"
"${unstable_env[@]}" cargo clippy --all-targets --all-features -- -D warnings

step "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features

step "tests (stable tokio)"
cargo test --all-features 2>&1 | tee -a "$log"

step "tests (--cfg tokio_unstable)"
"${unstable_env[@]}" cargo test --all-features 2>&1 | tee -a "$log"

step "Miri: the watched future's note, its wakers, the task waker, the board's slots (the unsafe code)"
# Stacked borrows and data races in the note's reference count and waker functions (a waker
# pointer derived from a shared reference was found this way). Nightly's Miri is installed if
# missing; if it cannot be (no network), the step says so and the run goes on.
if ! cargo +nightly miri --version >/dev/null 2>&1; then
  rustup toolchain install nightly --profile minimal --component miri,rust-src >/dev/null 2>&1 || true
fi
if cargo +nightly miri --version >/dev/null 2>&1; then
  # Isolation off: the board reads the monotonic and wall clocks. Left to the native runs
  # above: the race test of the task waker (20,000 rounds), and one board test whose short
  # poll is timed with the real clock (Miri runs a thousand times slower: it is not short).
  MIRIFLAGS=-Zmiri-disable-isolation CARGO_TARGET_DIR=target/miri cargo +nightly miri test \
    --no-default-features --lib -- probe::watched::tests probe::task_waker::tests board::tests \
    --skip no_wake_is_lost --skip a_slow_poll_that_starts_and_ends_while_the_watchdog_sleeps \
    2>&1 | tee -a "$log"
else
  echo "SKIPPED: nightly Miri could not be installed here"
fi

step "macOS, Windows and aarch64 Linux still build (cargo check; the Linux-only diagnosis is compiled out)"
# Every feature but `otlp-tls`: ring's build script compiles C for the target, and this machine
# has no C cross-compiler (ring builds natively on each of them).
cross_features=task-spans,schedule-delay,rayon,prometheus,otlp,tower,axum
for target in x86_64-apple-darwin x86_64-pc-windows-gnu aarch64-unknown-linux-gnu; do
  rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target"
  CARGO_TARGET_DIR=target/cross cargo check --lib --features "$cross_features" --target "$target"
done

step "otlp without otlp-tls: an https endpoint from the environment turns OTLP off with a warning"
cargo test --features otlp --test otlp_env 2>&1 | tee -a "$log"
cargo test --features otlp --lib builder 2>&1 | tee -a "$log"

step "the tower layer without axum (no matched route: named by a given route or the method)"
cargo test --lib --no-default-features --features tower tower 2>&1 | tee -a "$log"

step "default features (no otlp): the OTEL_* variables are ignored, never an error"
cargo test --lib 2>&1 | tee -a "$log"

step "no default features (no fmt, no prometheus): the library and its layer still build and run"
cargo test --lib --no-default-features 2>&1 | tee -a "$log"

step "the non-Linux code path (Linux-only diagnosis compiled out with --cfg loopwatch_portable)"
RUSTFLAGS="--cfg loopwatch_portable -D warnings" CARGO_TARGET_DIR=target/portable \
  cargo test --lib --test diagnosis --test detection \
  2>&1 | tee -a "$log"

step "demo (it must report its stalls, with victims on stable tokio, and end by itself)"
example env -- --example demo
tail -n 8 <<<"$out"
# Its log goes to a pipe here: `init()` colours a terminal only.
if grep -q $'\x1b\[' <<<"$raw_out"; then echo "escape codes in a redirected log" >&2; exit 1; fi
# (here-strings, not `echo | grep -q`: grep -q exits at the first match, and with pipefail the
# echo's SIGPIPE would fail the step)
for want in "stall detected" "in span render_report" "in span fetch_legacy_config" \
            "cause: cpu" "cause: syscall(" "hint: std::thread::sleep" \
            "waited behind it"; do
  grep -qF "$want" <<<"$out" || { echo "the demo's output lacks: $want" >&2; exit 1; }
done

step "demo with --cfg tokio_unstable: task spans and poll hooks under the global subscriber, victims"
example "${unstable_env[@]}" -- --example demo
tail -n 4 <<<"$out"
for want in "stall detected" "cause: cpu" "waited behind it"; do
  grep -qF "$want" <<<"$out" || { echo "the unstable demo's output lacks: $want" >&2; exit 1; }
done

step "mismatch examples print the report a user would see"
example env -- --example cpu_on_async
tail -n 6 <<<"$out"
for want in "in span render_report" "cause: cpu" "hint: move it to spawn_blocking"; do
  grep -qF "$want" <<<"$out" || { echo "cpu_on_async lacks: $want" >&2; exit 1; }
done
example env -- --example blocking_pool_saturated
tail -n 8 <<<"$out"
for want in "blocking pool saturated" "waiting for a thread" "jobs waited longer than the stall threshold"; do
  grep -qF "$want" <<<"$out" || { echo "blocking_pool_saturated lacks: $want" >&2; exit 1; }
done
example env -- --features rayon --example fine_grained_parallel
tail -n 5 <<<"$out"
for want in "jobs too fine" "hint: batch these" "too-fine reports: 1"; do
  grep -qF "$want" <<<"$out" || { echo "fine_grained_parallel lacks: $want" >&2; exit 1; }
done

step "a bad setting stops an example with words a person reads (Display, not Debug)"
out=$(LOOPWATCH_PROMETHEUS_ADDR=localhost:9464 timeout 120 cargo run -q --example cpu_on_async 2>&1 || true)
tail -n 2 <<<"$out"
grep -qF "error: invalid value" <<<"$out" || { echo "the error is not shown with Display" >&2; exit 1; }
grep -qF "host names are not resolved" <<<"$out" || { echo "the host-name hint is missing" >&2; exit 1; }
if grep -qF "InvalidEnv {" <<<"$out"; then echo "the error is shown with Debug" >&2; exit 1; fi

step "exporters/ and dashboards/: structure, and every metric they name is in the table"
python3 -c "import yaml" 2>/dev/null || python3 -m pip install -q pyyaml
python3 scripts/check_exporters.py

step "the dashboard type-checks against Grafana's own schema (@grafana/schema, tsc --strict)"
if ! command -v npm >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs npm
fi
python3 scripts/dashboard_schema.py

step "Prometheus rules: promtool check rules, promtool test rules"
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus
fi
promtool check rules exporters/prometheus/loopwatch-rules.yml exporters/prometheus/loopwatch-alerts.yml
promtool test rules exporters/prometheus/tests/loopwatch.test.yml

step "a real Prometheus server scrapes the demo while it stalls; promtool checks a scrape"
cargo build -q --example demo
timeout 300 python3 scripts/prometheus_e2e.py target/debug/examples/demo

step "a newcomer's walk-through: the README's axum service, built as written, reports a stall and fires an alert"
timeout 900 python3 scripts/newcomer.py

step "release demo, no debug info: stack frames still name the user's functions"
capture cargo build -q --release --example demo
capture timeout 300 cargo run -q --release --example demo
# The short line names the top frame of the user's code ("in demo::handle"): no debug info,
# so no file:line, and the name comes from the symbol table.
release_frame='loopwatch: stall (stack|ended):.* in demo::'
grep -qE "$release_frame" <<<"$out" || { echo "no named user frame in a release stack" >&2; exit 1; }
grep -E "$release_frame" <<<"$out" | head -n 1 | cut -c1-300 || true

step "bench smoke run (numbers at this scale mean nothing; docs/PERFORMANCE.md has the real ones)"
LOOPWATCH_BENCH_SCALE=0.01 timeout 600 cargo bench --features otlp --bench overhead

echo
echo "all checks passed"
# One closing line over every test run above (three builds).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
