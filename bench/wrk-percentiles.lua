-- wrk `done` hook for `cargo xtask bench`: prints one machine-readable line
-- with the run's totals and latency percentiles in microseconds. wrk's own
-- `--latency` report stops at p99; the benchmark also wants p99.9.
-- With MAYFLY_BENCH_POST_BODY set (not empty), every request POSTs it.
local body = os.getenv("MAYFLY_BENCH_POST_BODY")
if body and body ~= "" then
  wrk.method = "POST"
  wrk.body = body
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "mayfly-bench requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d " ..
    "p50=%d p99=%d p999=%d max=%d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
