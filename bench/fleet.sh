#!/usr/bin/env bash
# Fleet mode figures, on one machine: real nats-servers (JetStream) and
# several `mayfly serve --nats` nodes on loopback.
#
#   1. on a 3-server cluster (R3): deploy propagation, from a deploy call's
#      answer on the first node to the first 200 on the last node, and
#      rollback propagation, from a rollback's answer to every node serving
#      the previous version, to 3 and to 5 nodes;
#   2. on one server: hello requests/s on 1 node vs 3 nodes (three wrk
#      processes either way), with the CPU per request of every process (nodes and
#      nats-server): the nodes
#      share the same 2 cores, so 3 nodes cannot be faster here, and CPU
#      per request is the figure that carries over to real machines;
#   3. queue-trigger drain, events/s, on 1 vs 3 nodes.
#
#   bench/fleet.sh            full run: release build
#   bench/fleet.sh --smoke    seconds-long run on the debug build (CI)
#
# Needs wrk. Set MAYFLY_BIN to use another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE

smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true
command -v wrk >/dev/null || { echo "fleet.sh needs wrk (apt-get install wrk)" >&2; exit 1; }

cargo xtask guests >/dev/null
nats_server=$(cargo xtask nats-server)
. bench/build.sh
bench_build
hello=guests/target/wasm32-wasip2/release/hello.wasm

if $smoke; then
  deploys=2 load_time=2s events=200
else
  deploys=${DEPLOYS:-10} load_time=15s events=5000
fi

work=$(mktemp -d)
pids=()
stop_all() {
  for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null || true; done
  for p in ${pids[@]+"${pids[@]}"}; do wait "$p" 2>/dev/null || true; done
  pids=()
}
# On a failure, the nodes' own words first.
trap 'status=$?; [ "$status" = 0 ] || for f in "$work"/*/err; do echo "== $f" >&2; tail -n 20 "$f" >&2; done; stop_all; rm -rf "$work"' EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
now_ms() { date +%s%3N; }

# Starts a fresh nats-server and sets $nats_url and $nats_pid.
start_nats() {
  local port monitor dir
  port=$(free_port) monitor=$(free_port) dir=$(mktemp -d -p "$work")
  "$nats_server" -js -sd "$dir" -a 127.0.0.1 -p "$port" -m "$monitor" >"$dir/log" 2>&1 &
  nats_pid=$!
  pids+=("$nats_pid")
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$monitor/healthz" >/dev/null && break
    sleep 0.1
  done
  nats_url=nats://127.0.0.1:$port
}

# Starts a 3-server JetStream cluster (every stream and bucket in 3
# copies) and sets $nats_url to the list of its servers, $nats_pid to one.
start_cluster() {
  local i j client=() monitor=() route=() routes dir
  for i in 0 1 2; do client+=("$(free_port)") monitor+=("$(free_port)") route+=("$(free_port)"); done
  for i in 0 1 2; do
    routes=""
    for j in 0 1 2; do [ "$j" = "$i" ] || routes+="${routes:+,}nats://127.0.0.1:${route[$j]}"; done
    dir=$(mktemp -d -p "$work")
    "$nats_server" -js -sd "$dir" -a 127.0.0.1 -p "${client[$i]}" -m "${monitor[$i]}" -n "s$i" \
      --cluster_name bench --cluster "nats://127.0.0.1:${route[$i]}" --routes "$routes" >"$dir/log" 2>&1 &
    pids+=("$!")
    if [ "$i" = 0 ]; then nats_pid=$!; fi
  done
  for i in 0 1 2; do
    for _ in $(seq 1 300); do
      curl -sf "http://127.0.0.1:${monitor[$i]}/healthz" >/dev/null && break
      sleep 0.1
    done
  done
  nats_url=nats://127.0.0.1:${client[0]},nats://127.0.0.1:${client[1]},nats://127.0.0.1:${client[2]}
}

# Starts `count` nodes on $nats_url; fills the arrays node_pid, gateway,
# admin and exports MAYFLY_TOKEN (the first node's admin token, which the
# whole fleet accepts).
start_nodes() {
  local count=$1 i dir
  node_pid=() gateway=() admin=()
  for i in $(seq 1 "$count"); do
    dir=$(mktemp -d -p "$work")
    : >"$dir/out" # exists before the node's shell opens it, for the wait below
    RUST_LOG=warn "$MAYFLY_BIN" serve --data-dir "$dir/data" --listen 127.0.0.1:0 \
      --admin-listen 127.0.0.1:0 --nats "$nats_url" --node-name "n$i" \
      --nats-namespace bench >"$dir/out" 2>"$dir/err" &
    node_pid+=("$!")
    pids+=("$!")
    for _ in $(seq 1 300); do
      [ "$(wc -l <"$dir/out")" -ge 2 ] && break
      kill -0 "${node_pid[-1]}" 2>/dev/null || { cat "$dir/err" >&2; exit 1; }
      sleep 0.1
    done
    gateway+=("$(sed -n 's/^gateway listening on //p' "$dir/out")")
    admin+=("$(sed -n 's/^admin API listening on //p' "$dir/out")")
    if [ "$i" = 1 ]; then
      MAYFLY_TOKEN=$(cat "$dir/data/admin.token")
      export MAYFLY_TOKEN
    fi
  done
}

cpu_ticks() { # the summed user+system ticks of the given pids
  local total=0 p
  for p in "$@"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$total"
}
hz=$(getconf CLK_TCK)

median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

# Deploys `deploys` functions through the first node; prints the median and
# the worst time from each deploy's answer to the first 200 on every node.
propagation() {
  local k t0 last node times=()
  for k in $(seq 1 "$deploys"); do
    MAYFLY_ADMIN_URL=${admin[0]} "$MAYFLY_BIN" deploy "p$k" "$hello" --route "/p$k" >/dev/null
    t0=$(now_ms)
    last=0
    for node in "${gateway[@]}"; do
      until [ "$(curl -s -o /dev/null -w '%{http_code}' "$node/p$k")" = 200 ]; do sleep 0.005; done
    done
    times+=("$(($(now_ms) - t0))")
  done
  # The first deploy of a component compiles it on every node; the others
  # reuse each node's compiled artifact (same digest), so they measure
  # propagation alone.
  printf 'first %s ms (with compilation); then ' "${times[0]}"
  printf '%s\n' "${times[@]:1}" | median | xargs printf 'median %s ms'
  printf '%s\n' "${times[@]:1}" | sort -n | tail -1 | xargs printf ', worst %s ms\n'
}

# Moves `live` back and forth `deploys` times between two versions (each
# rollback goes to the version the last one left, so no new version is
# made and none is pruned); prints the median and the worst time from the
# rollback's answer to every node answering with the new version's
# x-mayfly-version.
rollbacks() {
  local echo=guests/target/wasm32-wasip2/release/echo.wasm k t0 node to times=()
  MAYFLY_ADMIN_URL=${admin[0]} "$MAYFLY_BIN" deploy r "$hello" --route /r --wait 30s >/dev/null
  MAYFLY_ADMIN_URL=${admin[0]} "$MAYFLY_BIN" deploy r "$echo" --route /r --wait 30s >/dev/null
  for k in $(seq 1 "$deploys"); do
    to=$(MAYFLY_ADMIN_URL=${admin[-1]} "$MAYFLY_BIN" rollback r | sed -n 's/^live: [0-9]* -> \([0-9]*\)$/\1/p')
    t0=$(now_ms)
    for node in "${gateway[@]}"; do
      until curl -s -o /dev/null -D - "$node/r" | tr -d '\r' | grep -qx "x-mayfly-version: $to"; do
        sleep 0.005
        [ $(( $(now_ms) - t0 )) -lt 30000 ] || { echo "$node does not serve version $to 30 s after the rollback" >&2; exit 1; }
      done
    done
    times+=("$(($(now_ms) - t0))")
  done
  printf '%s\n' "${times[@]}" | median | xargs printf 'median %s ms'
  printf '%s\n' "${times[@]}" | sort -n | tail -1 | xargs printf ', worst %s ms\n'
}

# Loads /hello with three wrk processes (one thread, 21 connections each)
# spread over the nodes, the same load generator whatever the fleet's
# size; prints the summed requests/s and CPU per request of all nodes and
# of nats-server.
load() {
  local before after nats_before nats_after i requests=0 rps=0 wrks=()
  for node in "${gateway[@]}"; do curl -sf "$node/hello" >/dev/null; done
  before=$(cpu_ticks "${node_pid[@]}") nats_before=$(cpu_ticks "$nats_pid")
  for i in 0 1 2; do
    wrk -t1 -c21 -d"$load_time" "${gateway[$((i % ${#gateway[@]}))]}/hello" >"$work/wrk$i" &
    wrks+=("$!")
  done
  wait "${wrks[@]}"
  after=$(cpu_ticks "${node_pid[@]}") nats_after=$(cpu_ticks "$nats_pid")
  for i in 0 1 2; do
    if grep -qE "Non-2xx|Socket errors" "$work/wrk$i"; then
      cat "$work/wrk$i" >&2; echo "error responses during the load run" >&2; exit 1
    fi
    requests=$((requests + $(awk '/requests in/ {print $1}' "$work/wrk$i")))
    rps=$(awk -v a="$rps" -v b="$(awk '/Requests\/sec/ {print $2}' "$work/wrk$i")" 'BEGIN {print a + b}')
  done
  awk -v rps="$rps" -v n="$requests" -v t=$((after - before)) -v nt=$((nats_after - nats_before)) -v hz="$hz" \
    'BEGIN { printf "req/s %8.0f  CPU/request: nodes %4.0f us, nats-server %4.0f us\n", rps, t / hz / n * 1e6, nt / hz / n * 1e6 }'
}

# Preloads `events` messages, attaches a queue trigger to `sink`, and
# prints events/s until every node's delivered counters add up to them.
drain() {
  local queue=$1 sent=0 batch body delivered=0 t0
  MAYFLY_ADMIN_URL=${admin[0]} "$MAYFLY_BIN" deploy sink "$hello" >/dev/null
  for node in "${admin[@]}"; do # the deploy reached every node
    until curl -sf -H "authorization: Bearer $MAYFLY_TOKEN" "$node/v1/functions/sink" >/dev/null; do sleep 0.05; done
  done
  while [ "$sent" -lt "$events" ]; do
    batch=$(( events - sent < 1000 ? events - sent : 1000 ))
    body=$(python3 -c "import json,sys; print(json.dumps({'messages': list(range($batch))}))")
    curl -sf -H "authorization: Bearer $MAYFLY_TOKEN" -H 'content-type: application/json' \
      -d "$body" "${admin[0]}/v1/queues/$queue/batch" >/dev/null
    sent=$((sent + batch))
  done
  t0=$(now_ms)
  MAYFLY_ADMIN_URL=${admin[0]} "$MAYFLY_BIN" trigger add sink --queue "$queue" \
    --batch-size 128 --max-concurrency 128 >/dev/null
  while [ "$delivered" -lt "$events" ]; do
    sleep 0.05
    delivered=0
    for node in "${admin[@]}"; do
      delivered=$((delivered + $(curl -sf -H "authorization: Bearer $MAYFLY_TOKEN" "$node/metrics" |
        awk '/^mayfly_event_deliveries_total\{function="sink",result="delivered"\}/ {n = int($2)} END {print n + 0}')))
    done
    [ $(( $(now_ms) - t0 )) -lt 600000 ] || { echo "only $delivered of $events delivered" >&2; exit 1; }
  done
  awk -v n="$events" -v ms=$(($(now_ms) - t0)) 'BEGIN { printf "%d events in %.2f s: %.0f events/s\n", n, ms / 1000, n / ms * 1000 }'
}

echo "mayfly $("$MAYFLY_BIN" --version | awk '{print $2}') fleet on nats-server ($("$nats_server" --version)), $(nproc) cores, binary $MAYFLY_BIN"

for size in 3 5; do
  start_cluster
  start_nodes "$size"
  printf 'R3 cluster, deploy propagation to %d nodes (%d deploys): ' "$size" "$deploys"
  propagation
  printf 'R3 cluster, rollback propagation to %d nodes (%d rollbacks): ' "$size" "$deploys"
  rollbacks
  stop_all
done

for size in 1 3; do
  start_nats
  start_nodes "$size"
  MAYFLY_ADMIN_URL=${admin[0]} "$MAYFLY_BIN" deploy hello "$hello" --route /hello >/dev/null
  for node in "${gateway[@]}"; do
    until curl -sf "$node/hello" >/dev/null; do sleep 0.05; done
  done
  $smoke || for node in "${gateway[@]}"; do wrk -t1 -c8 -d3s "$node/hello" >/dev/null; done # warm-up
  printf 'hello on %d node(s), 63 connections: ' "$size"
  load
  printf 'queue drain on %d node(s): ' "$size"
  drain "q$size"
  stop_all
done
