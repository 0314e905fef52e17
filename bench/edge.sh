#!/usr/bin/env bash
# Edge sites (issue 18, docs/edge-design.md §8 step 11), on one machine:
# a hub and two leaf sites (real nats-servers started by the test harness,
# each leaf link through its user-space proxy, which can delay and cut it)
# and two `mayfly serve` nodes, `a` at site-a and `b` at site-b, with the
# echo guest pinned to site=a. The driver (crates/cli/examples/edge_bench.rs)
# measures
#
#   1. 1 KiB POST latency (p50/p90/p99) served locally at a vs sent to b
#      and forwarded through the hub to a, with 0, 10 and 25 ms added one
#      way on both leaf links;
#   2. catch-up: site a's link cut, N requests served at a (their usage
#      records wait in site a's JetStream), then the time from the heal to
#      the leaf link up, and on to every record in the hub's usage stream
#      and the fleet usage total counting every request exactly once
#      (checked equal, never above).
#
#   bench/edge.sh            full run: release build, 500 requests per row,
#                            10,000 buffered records, 3 catch-up runs with
#                            short cuts and 3 with 30 s cuts; writes
#                            bench/results/edge.md
#   bench/edge.sh --smoke    debug build, 10 requests per row, 300 records,
#                            1 run (prints only)
#
# Set MAYFLY_BIN to use another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE

smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true

cargo xtask guests >/dev/null
MAYFLY_NATS_SERVER=$(cargo xtask nats-server)
export MAYFLY_NATS_SERVER
given_bin=${MAYFLY_BIN:-}
. bench/build.sh
bench_build edge_bench
echo=guests/target/wasm32-wasip2/release/echo.wasm

if $smoke; then
  per_row=10 records=300 runs=1 long_cut=0
else
  per_row=${PER_ROW:-500} records=${RECORDS:-10000} runs=${RUNS:-3} long_cut=${LONG_CUT:-30}
fi

header() {
  echo "mayfly $("$MAYFLY_BIN" --version | awk '{print $2}') edge sites on $("$MAYFLY_NATS_SERVER" --version),"
  echo "$(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), load average $(cut -d' ' -f1-3 /proc/loadavg) at the start,"
  echo "binary $MAYFLY_BIN; every nats-server, proxy, node and client on the same machine, over loopback"
}

if $smoke; then
  header
  "$examples/edge_bench" "$MAYFLY_BIN" "$echo" "$per_row" "$records" "$runs" "$long_cut"
  exit
fi

out=$(mktemp)
trap 'rm -f "$out"' EXIT
{
  header
  "$examples/edge_bench" "$MAYFLY_BIN" "$echo" "$per_row" "$records" "$runs" "$long_cut"
} | tee "$out"
{
  echo "# Edge sites (bench/edge.sh)"
  echo
  echo "Measured $(date -u +%Y-%m-%d) with \`${given_bin:+MAYFLY_BIN=$given_bin }bash bench/edge.sh\`:"
  echo
  cat "$out"
  echo
  cat <<'NOTES'
Reading it:

- The machine is shared (other builds and tests run beside the bench), so
  every figure is noisy; compare rows of one run rather than runs.
- The delay is added by a user-space proxy on each leaf link, per chunk,
  with no bandwidth cap; its timer rounds each deadline up to the next
  millisecond. A forwarded request crosses two leaf links each way (site b
  → hub → site a and back), so it pays 4 × the one-way delay, plus about
  1 ms of rounding per crossing, on top of the undelayed forward.
- Local requests at a never cross a leaf link: their figures do not move
  with the delay.
- Catch-up: "leaf link up" is when both servers list the link (`/leafz`,
  polled every 10 ms); "all in the hub's stream" is the hub's usage stream
  holding exactly as many records as requests served (`/jsz`); "fleet
  total exact" is node b's `/v1/usage` total, which its materialiser pulls
  from that stream in batches. A total above the requests served stops the
  bench (double count).
- After a long cut the first catch-up can wait about 5 s for the hub to
  retry its source of the site's stream (docs/edge-design.md §2.3, §3.2);
  short cuts do not meet it.
NOTES
} >bench/results/edge.md
