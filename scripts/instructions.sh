#!/usr/bin/env bash
# Instructions each probe adds per poll, counted by callgrind: 1M tiny polls (100 tasks x 10,000
# yields) on a current_thread runtime per probe. Counted on the thread that polls (the main
# thread, which runs the runtime), so the count does not depend on how busy the host is. The
# workload runs at a 500 ms threshold (tick 125 ms; see `instructions` in the bench): a poll a
# watchdog tick lands in ends on the full path, and at the default 10 ms valgrind's ~50x
# slowdown made that ~50x more frequent than natively and varied with the host's load (up to
# +7 per poll between runs of one binary). Repeated runs now agree to ~0.01 per poll; each
# probe is still counted LOOPWATCH_INSTR_RUNS times (default 3) and the lowest count shown.
# The watchdog thread's own instructions depend on how many ticks fit in the run, so they are
# shown apart.
# Only the run is counted, not the set-up: on the polling thread, what runs inside the runtime's
# `block_on` (spawning the tasks, polling them, joining them); on the others, the watchdog's run
# loop. Counted whole, a thread's total moved by up to 1.6 per poll between runs of one binary:
# glibc's `calloc` zeroes a big allocation made at set-up (the layer's span table, 1.5 MiB) with
# a `memset` or hands out fresh pages that need none, depending on what was freed before.
# LOOPWATCH_INSTR_BIN=path counts an already built bench binary (to compare two builds).
set -euo pipefail
shopt -s inherit_errexit # a count that fails stops the script, inside `$(...)` too
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || apt-get install -y valgrind
# LOOPWATCH_INSTR_STABLE=1 counts the stable-tokio build (no poll hooks, no tokio task spans:
# the span rows are then one span per poll).
if [ -z "${LOOPWATCH_INSTR_STABLE:-}" ]; then
  export RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=target/unstable
fi
bin=${LOOPWATCH_INSTR_BIN:-$(cargo bench --bench overhead --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*overhead[^"]*\)".*/\1/p' | tail -n 1)}
# Prints "polling-thread-instructions other-threads-instructions" for one probe: the run with
# the fewest on the polling thread, of LOOPWATCH_INSTR_RUNS.
count() {
  local best="" r line
  for ((r = 0; r < ${LOOPWATCH_INSTR_RUNS:-3}; r++)); do
    line=$(count_once "$1")
    if [ -z "$best" ] || [ "${line%% *}" -lt "${best%% *}" ]; then best=$line; fi
  done
  echo "$best"
}
count_once() {
  local dir
  dir=$(mktemp -d)
  LOOPWATCH_BENCH_ONLY="instructions:$1" valgrind --tool=callgrind --separate-threads=yes \
    --collect-atstart=no --toggle-collect='tokio::runtime::runtime::Runtime::block_on' \
    --toggle-collect='loopwatch::watchdog::Watchdog::run' \
    --callgrind-out-file="$dir/cg" "$bin" >/dev/null 2>&1 ||
    { echo "instructions.sh: the bench failed under valgrind for $1" >&2; return 1; }
  local main=0 rest=0 f n
  for f in "$dir"/cg-*; do
    n=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$f" | head -n 1)
    case "$f" in
      *-01) main=$n ;;
      *) rest=$((rest + ${n:-0})) ;;
    esac
  done
  rm -rf "$dir"
  if [ "$main" -eq 0 ]; then
    echo "instructions.sh: nothing counted inside tokio's Runtime::block_on for $1 (renamed or" \
      "inlined in this tokio?): see --toggle-collect in this script" >&2
    return 1
  fi
  echo "$main $rest"
}
line=$(count bare)
read -r bare _ <<<"$line"
polls=1000100
printf '%-12s %14s %12s %16s\n' probe instructions "added/poll" "other threads"
# (The poll-hook rows need `tokio_unstable`: a stable build has no hooks to count.)
if [ -z "${LOOPWATCH_INSTR_STABLE:-}" ]; then
  variants="bare watch watch-nowake hooks-empty hooks-nosched hooks hooks-tokio span-registry span-layer"
else
  variants="bare watch watch-nowake span-registry span-layer"
fi
for v in ${LOOPWATCH_INSTR_VARIANTS:-$variants}; do
  line=$(count "$v")
  read -r n rest <<<"$line"
  printf '%-12s %14s %12.1f %16s\n' "$v" "$n" "$(echo "($n - $bare) / $polls" | bc -l)" "$rest"
done
# Per spawned task (W2's shape: 100,000 tasks of one poll, spawned 1,000 at a time and awaited):
# what a probe costs a task beyond its polls (its set-up, first poll and drop). Off with
# LOOPWATCH_INSTR_SPAWN=0.
if [ "${LOOPWATCH_INSTR_SPAWN:-1}" != 0 ]; then
  line=$(count bare/spawn)
  read -r bare _ <<<"$line"
  tasks=100000
  echo
  printf '%-12s %14s %12s %16s\n' probe instructions "added/task" "other threads"
  for v in ${LOOPWATCH_INSTR_VARIANTS:-$variants}; do
    [ "$v" = bare ] && continue
    line=$(count "$v/spawn")
    read -r n rest <<<"$line"
    printf '%-12s %14s %12.1f %16s\n' "$v" "$n" "$(echo "($n - $bare) / $tasks" | bc -l)" "$rest"
  done
fi
