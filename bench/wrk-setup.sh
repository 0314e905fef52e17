# Sourced by the wrk-driven bench scripts (http-load.sh, fairness.sh): reads
# `--smoke`, checks for wrk, builds the guests and, unless MAYFLY_BIN names
# one, the node binary (debug for smoke runs, release otherwise). Sets
# $smoke and $MAYFLY_BIN.
smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }

cargo xtask guests >/dev/null
. bench/build.sh
bench_build
