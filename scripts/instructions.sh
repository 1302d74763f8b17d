#!/usr/bin/env bash
# Instructions each probe adds per poll, counted by callgrind (deterministic: the same binary
# and input give the same count, however busy the host is). 1M tiny polls on a current_thread
# runtime per probe; the watchdog runs beside them and is counted too.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || apt-get install -y valgrind
export RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=target/unstable
bin=$(cargo bench --bench overhead --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*overhead[^"]*\)".*/\1/p' | tail -n 1)
count() {
  LOOPWATCH_BENCH_ONLY="instructions:$1" valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    "$bin" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
bare=$(count bare)
polls=1000100
printf '%-12s %14s %12s\n' probe instructions "added/poll"
for v in bare watch watch-nowake hooks-empty hooks; do
  n=$(count "$v")
  printf '%-12s %14s %12.1f\n' "$v" "$n" "$(echo "($n - $bare) / $polls" | bc -l)"
done
