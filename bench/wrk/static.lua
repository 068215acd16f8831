-- One fixed request, sent as fast as the connections allow (no per-request Lua).
-- BENCH_METHOD, BENCH_BODY, BENCH_KEY (virtual key), BENCH_TTL (result TTL header).
-- Prints one line "BENCH_RESULT {json}" with requests, duration, p50/p99 (µs), errors.
wrk.method = os.getenv("BENCH_METHOD") or "GET"
local body = os.getenv("BENCH_BODY") or ""
if body ~= "" then wrk.body = body end
wrk.headers["authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "sk-bf-bench")
if body ~= "" then wrk.headers["content-type"] = "application/json" end
local ttl = os.getenv("BENCH_TTL") or ""
if ttl ~= "" then wrk.headers["x-bf-async-job-result-ttl"] = ttl end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
