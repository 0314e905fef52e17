#!/usr/bin/env bash
# Batch-job throughput: uploads N small objects, runs a job of the trivial
# `hello` guest over them (parallelism 256) and reports items/s, measured by
# the node (job created -> finished), plus the client's wall time; checks
# that every item finished exactly once (item log) and is in the ledger
# under the job's id. Compare with bench/events.sh (queue trigger -> hello):
# the per-item overhead of a job is 1/jobs_rate - 1/queue_rate.
#
#   bench/jobs.sh            full run: release build, 10,000 objects
#   bench/jobs.sh --smoke    500 objects on the debug build (CI)
#
# Set MAYFLY_BIN to use another binary, JOBS_N for another object count.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE

smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true
n=${JOBS_N:-$($smoke && echo 500 || echo 10000)}

cargo xtask guests >/dev/null
. bench/build.sh
bench_build

serve_flags=(--max-instances 512)
. bench/node.sh
export MAYFLY_ADMIN_URL=$admin
"$MAYFLY_BIN" deploy sink guests/target/wasm32-wasip2/release/hello.wasm >/dev/null

# Upload from 8 threads over kept-alive connections.
start=$(date +%s.%N)
python3 - "$admin" "$MAYFLY_TOKEN" "$n" <<'PY'
import http.client, sys, threading, urllib.parse
url, token, n = urllib.parse.urlsplit(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def upload(part):
    conn = http.client.HTTPConnection(url.hostname, url.port)
    for i in range(part, n, 8):
        conn.request("PUT", f"/v1/buckets/in/objects/data/{i:06}", body=b"x",
                     headers={"authorization": f"Bearer {token}"})
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 200, answer.status
threads = [threading.Thread(target=upload, args=(p,)) for p in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
PY
echo "uploaded $n objects in $(echo "$(date +%s.%N) - $start" | bc) s"

echo "mayfly $("$MAYFLY_BIN" --version | awk '{print $2}') job -> hello over $n objects, $(nproc) cores"
start=$(date +%s.%N)
"$MAYFLY_BIN" job run sink --input in/data/ --parallelism 256 --json >"$work/job.json"
wall=$(echo "$(date +%s.%N) - $start" | bc)
id=$(jq -r .id "$work/job.json")
state=$(jq -r .state "$work/job.json")
done_items=$(jq -r .items.done "$work/job.json")
ms=$(jq -r '.finished_ms - .created_ms' "$work/job.json")
[ "$state" = succeeded ] && [ "$done_items" = "$n" ] || { echo "job $id: $state, $done_items done" >&2; exit 1; }
echo "job $id: $n items in ${ms} ms on the node: $(echo "$n * 1000 / $ms" | bc) items/s (client wall ${wall}s incl. polling)"
# Exactly once: one `done` per item in the item log.
finished=$(curl -sS -H "authorization: Bearer $MAYFLY_TOKEN" "$admin/v1/jobs/$id/log?limit=10000" \
  | jq '[.entries[] | select(.outcome == "done") | .seq] | unique | length')
echo "item log: $finished distinct items finished"
[ "$finished" = "$n" ] || [ "$n" -gt 10000 ] || { echo "expected $n" >&2; exit 1; }
for _ in $(seq 1 100); do
  billed=$("$MAYFLY_BIN" usage --job "$id" --json | jq .total.invocations)
  [ "$billed" = "$n" ] && break
  sleep 0.1
done
echo "ledger: $billed invocations under the job"
echo "peak RSS $(awk '/VmHWM/ {print $2, $3}' "/proc/$pid/status")"
