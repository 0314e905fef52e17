#!/usr/bin/env bash
# HTTP load run against the hello function: requests/s, latency percentiles,
# server CPU per request and peak RSS, measured the way ../shared/BASELINES.md
# measures the peer runtimes (wrk -t2 -c64, loopback, after a warm-up).
#
#   bench/http-load.sh            full run: release build, 5 s warm-up, 3 x 15 s
#   bench/http-load.sh --smoke    seconds-long run on the debug build (CI)
#
# Needs wrk (apt-get install wrk). Set MAYFLY_BIN to use another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE

. bench/wrk-setup.sh "${1:-}"

. bench/node.sh
MAYFLY_ADMIN_URL=$admin "$MAYFLY_BIN" deploy hello guests/target/wasm32-wasip2/release/hello.wasm --route /hello >/dev/null
url="$gateway/hello"
curl -sf "$url" >/dev/null

cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)

run_wrk() { # threads connections duration
  local before after out requests
  before=$(cpu_ticks)
  out=$(wrk -t"$1" -c"$2" -d"$3" --latency "$url")
  after=$(cpu_ticks)
  if grep -q "Non-2xx" <<<"$out" || grep -q "Socket errors" <<<"$out"; then
    echo "$out" >&2; echo "error responses during the load run" >&2; exit 1
  fi
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  printf '%-10s req/s %10s  p50 %8s  p99 %8s  server CPU/request %6s us\n' \
    "c=$2" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1=="50%" {print $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")" \
    "$(awk -v t=$((after - before)) -v hz="$hz" -v n="$requests" 'BEGIN { printf "%.0f", t / hz / n * 1e6 }')"
}

echo "mayfly $("$MAYFLY_BIN" --version | awk '{print $2}') hello, $(nproc) cores, binary $MAYFLY_BIN"
if $smoke; then
  run_wrk 1 4 2s
else
  wrk -t2 -c64 -d5s "$url" >/dev/null   # warm-up
  for _ in 1 2 3; do run_wrk 2 64 15s; done
  run_wrk 1 1 10s
fi
echo "peak RSS $(awk '/VmHWM/ {print $2, $3}' "/proc/$pid/status")"
