#!/usr/bin/env bash
# Neighbour latency under CPU-bound guests: hello's p50/p99 alone, then while
# 2, 8 and 64 invocations of another function spin (hostile guest /loop),
# and the ratio to the baseline. Issue 15's target: p99 within 3x.
#
#   bench/fairness.sh            full run: release build, 10 s per step
#   bench/fairness.sh --smoke    seconds-long run on the debug build (CI)
#
# Needs wrk and curl. Set MAYFLY_BIN to use another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE

. bench/wrk-setup.sh "${1:-}"
duration=10s
loads=(2 8 64)
if $smoke; then duration=2s; loads=(2); fi

. bench/node.sh
wasm=guests/target/wasm32-wasip2/release
MAYFLY_ADMIN_URL=$admin "$MAYFLY_BIN" deploy hello "$wasm/hello.wasm" --route /hello >/dev/null
MAYFLY_ADMIN_URL=$admin "$MAYFLY_BIN" deploy spinner "$wasm/hostile.wasm" --route /loop \
  --timeout 300s --max-concurrency 64 >/dev/null
curl -sf "$gateway/hello" >/dev/null

# One client, one connection: each request's latency is the neighbour's own.
p50_p99() {
  local out
  out=$(wrk -t1 -c1 -d"$duration" --latency "$gateway/hello")
  if grep -q "Non-2xx" <<<"$out" || grep -q "Socket errors" <<<"$out"; then
    echo "$out" >&2; echo "error responses during the run" >&2; exit 1
  fi
  printf '%s %s' "$(awk '$1=="50%" {print $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")"
}
# wrk prints 1.23ms / 456.00us / 1.10s; in microseconds:
us() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000; else print n * 1e6 }'; }
running() { # how many spinner invocations run now
  curl -sf -H "authorization: Bearer $MAYFLY_TOKEN" "$admin/v1/status" | python3 -c '
import json, sys
rows = json.load(sys.stdin)["scaling"]
print(next((r["running"] for r in rows if r["function"] == "spinner"), 0))'
}

read -r base50 base99 <<<"$(p50_p99)"
echo "mayfly $("$MAYFLY_BIN" --version | awk '{print $2}'), $(nproc) cores, binary $MAYFLY_BIN"
printf '%-12s p50 %9s  p99 %9s\n' "alone" "$base50" "$base99"
spinners=0
for load in "${loads[@]}"; do
  while [ "$spinners" -lt "$load" ]; do
    curl -s -o /dev/null --max-time 600 "$gateway/loop" &
    spinners=$((spinners + 1))
  done
  for _ in $(seq 1 300); do [ "$(running)" -ge "$load" ] && break; sleep 0.1; done
  read -r p50 p99 <<<"$(p50_p99)"
  printf '%-12s p50 %9s  p99 %9s  p99 ratio %5.1fx\n' "$load spinning" "$p50" "$p99" \
    "$(awk -v a="$(us "$p99")" -v b="$(us "$base99")" 'BEGIN { print a / b }')"
done
