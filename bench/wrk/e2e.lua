-- Jobs end to end, as a client runs them: submit a job, and once it has had
-- time to finish, poll it once. Each wrk thread keeps the ids of its accepted
-- jobs in submit order and polls the oldest once more than `lag` are waiting
-- (BENCH_LAG at first); a poll that still finds the job unfinished (202) puts
-- it back at the end and makes `lag` longer by a quarter of BENCH_LAG (up to
-- BENCH_MAX_LAG), and every 16 polls that find their job completed make it
-- shorter by one (down to BENCH_LAG): `lag` follows how long a job takes, so
-- that about one poll in a hundred comes early and few finished jobs are
-- left unpolled when wrk stops. A job counts when its poll answers 200 with
-- the job completed.
-- BENCH_PATH (the submit path), BENCH_BODY, BENCH_KEY, BENCH_TTL, BENCH_LAG,
-- BENCH_MAX_LAG.
-- Prints "BENCH_E2E {json}": jobs completed, submits and polls sent, 202
-- answers, polls that found their job unfinished, the longest lag reached,
-- failed jobs, other answers by status.
local path = os.getenv("BENCH_PATH") or "/v1/async/audio/speech"
local lag = tonumber(os.getenv("BENCH_LAG") or "32")
local step = math.max(1, math.floor(lag / 4))
local min_lag = lag
local max_lag = tonumber(os.getenv("BENCH_MAX_LAG") or "1024")
local submit_headers = {
  ["authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "sk-bf-bench"),
  ["content-type"] = "application/json",
}
local poll_headers = { ["authorization"] = submit_headers["authorization"] }
local ttl = os.getenv("BENCH_TTL") or ""
if ttl ~= "" then submit_headers["x-bf-async-job-result-ttl"] = ttl end
local submit

function init(args)
  submit = wrk.format("POST", path, submit_headers, os.getenv("BENCH_BODY"))
end

-- Globals, so that done() (in wrk's main state) can read them with thread:get.
submits, polls, answers202, unfinished, completed, failed, other, final_lag = 0, 0, 0, 0, 0, 0, {}, lag
local waiting, head, tail = {}, 1, 0
local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

local polled = {}  -- ids whose poll is out: a 202 naming one is a poll's, not a submit's

function request()
  if tail - head + 1 > lag then
    local id = waiting[head]
    waiting[head] = nil
    head = head + 1
    polls = polls + 1
    polled[id] = true
    return wrk.format("GET", path .. "/" .. id, poll_headers)
  end
  submits = submits + 1
  return submit
end

function response(status, headers, body)
  local id = string.match(body, '"id"%s*:%s*"([^"]+)"')
  if status == 202 and id then
    answers202 = answers202 + 1
    if polled[id] then
      -- Polled too early: give the jobs longer.
      polled[id] = nil
      unfinished = unfinished + 1
      lag = math.min(max_lag, lag + step)
      final_lag = math.max(final_lag, lag)
    end
    tail = tail + 1
    waiting[tail] = id
  elseif status == 200 then
    if id then polled[id] = nil end
    if string.find(body, '"status":"completed"', 1, true) then
      completed = completed + 1
      if completed % 16 == 0 and lag > min_lag then
        lag = lag - 1
      end
    else
      failed = failed + 1
    end
  else
    other[status] = (other[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local c, s, p, f, a, u, l, parts, counts = 0, 0, 0, 0, 0, 0, 0, {}, {}
  for _, t in ipairs(threads) do
    c = c + t:get("completed"); s = s + t:get("submits"); p = p + t:get("polls"); f = f + t:get("failed")
    a = a + t:get("answers202"); u = u + t:get("unfinished"); l = math.max(l, t:get("final_lag"))
    for status, count in pairs(t:get("other")) do
      counts[status] = (counts[status] or 0) + count
    end
  end
  for status, count in pairs(counts) do
    parts[#parts + 1] = string.format('"%d":%d', status, count)
  end
  io.write(string.format(
    'BENCH_E2E {"completed":%d,"submits":%d,"polls":%d,"failed":%d,"answers202":%d,"unfinished":%d,"lag":%d,' ..
    '"duration_us":%d,' ..
    '"p50_us":%d,"p99_us":%d,"other":{%s}}\n',
    c, s, p, f, a, u, l, summary.duration, latency:percentile(50), latency:percentile(99), table.concat(parts, ",")))
end
