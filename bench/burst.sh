#!/usr/bin/env bash
# Burst run: 1,000 clients open a connection and send one request each at the
# same instant, to a function that waits 50 ms (hostile /sleep?ms=50), for 5
# rounds; prints p50/p99/max latency per round. Fails on any error.
#
#   bench/burst.sh            full run: release build, 1,000 clients x 5 rounds
#   bench/burst.sh --smoke    100 clients x 1 round on the debug build (CI)
#
# Set MAYFLY_BIN to use another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE

smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true

cargo xtask guests >/dev/null
. bench/build.sh
bench_build burst
burst=$examples/burst

# The budget is a promise per running invocation (16 MB each here), not an
# allocation: make room for the whole burst whatever this machine's RAM.
serve_flags=(--max-instances 1000 --memory-budget 1000000)
. bench/node.sh
MAYFLY_ADMIN_URL=$admin "$MAYFLY_BIN" deploy sleepy guests/target/wasm32-wasip2/release/hostile.wasm \
  --route /sleep --memory 16 >/dev/null

echo "mayfly $("$MAYFLY_BIN" --version | awk '{print $2}') burst against /sleep?ms=50, $(nproc) cores"
if $smoke; then
  "$burst" "$gateway/sleep?ms=50" 100 1
else
  "$burst" "$gateway/sleep?ms=50" 1000 5
fi
echo "peak RSS $(awk '/VmHWM/ {print $2, $3}' "/proc/$pid/status")"
