#!/usr/bin/env bash
# Queue-trigger throughput and end-to-end event latency: preloads a queue,
# attaches a queue trigger (batch 128, concurrency 128) to the trivial
# `hello` guest, and reports events/s while it drains; then sends messages
# one at a time and reports p50/p99 from stored to acknowledged.
#
#   bench/events.sh            full run: release build, 100,000 events, 2,000 latency samples
#   bench/events.sh --smoke    2,000 events and 100 samples on the debug build (CI)
#
# Set MAYFLY_BIN to use another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE

smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true

cargo xtask guests >/dev/null
. bench/build.sh
bench_build events_bench
driver=$examples/events_bench

serve_flags=()
. bench/node.sh
MAYFLY_ADMIN_URL=$admin "$MAYFLY_BIN" deploy sink guests/target/wasm32-wasip2/release/hello.wasm >/dev/null

echo "mayfly $("$MAYFLY_BIN" --version | awk '{print $2}') queue trigger -> hello, $(nproc) cores"
if $smoke; then
  "$driver" "$admin" sink 2000 100
else
  "$driver" "$admin" sink 100000 2000
fi
echo "peak RSS $(awk '/VmHWM/ {print $2, $3}' "/proc/$pid/status")"
