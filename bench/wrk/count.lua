-- Submits until exactly BENCH_COUNT submits were accepted (202), then stops
-- (and writes BENCH_DONE_FILE so that the runner can end wrk with SIGINT).
-- A refused submit (e.g. 503 store full) is sent again, as a client honouring
-- Retry-After would (without the wait). While the last submits are in flight,
-- the connections send a cheap filler (GET BENCH_FILLER, a 200 direct_response) so
-- that no more than BENCH_COUNT jobs are ever accepted.
-- Prints "BENCH_COUNT {json}" with accepted and refused counts by status.
local target = tonumber(os.getenv("BENCH_COUNT") or "1000")
local headers = {
  ["authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "sk-bf-bench"),
  ["content-type"] = "application/json",
}
local ttl = os.getenv("BENCH_TTL") or ""
if ttl ~= "" then headers["x-bf-async-job-result-ttl"] = ttl end
local submit, filler

-- Built in init, once wrk has set the Host header (it is not set while the script loads).
function init(args)
  submit = wrk.format("POST", os.getenv("BENCH_PATH") or "/v1/async/audio/speech", headers, os.getenv("BENCH_BODY"))
  filler = wrk.format("GET", os.getenv("BENCH_FILLER") or "/direct/poll", {})
end

-- Globals, so that done() (in wrk's main state) can read them with thread:get.
sent, answered, accepted, fillers, refused, finished = 0, 0, 0, 0, {}, false
local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

local verified = false

function request()
  if not verified then
    -- wrk calls request() once after init to check the request parses, and
    -- never sends that one: not counted as sent.
    verified = true
    return submit
  end
  if accepted + (sent - answered) < target then
    sent = sent + 1
    return submit
  end
  return filler
end

function response(status, headers, body)
  if status == 202 then
    answered = answered + 1
    accepted = accepted + 1
    if accepted >= target and not finished then
      -- wrk runs until -d even when a thread stops: tell the runner, which sends SIGINT.
      finished = true
      wrk.thread:stop()
      local f = io.open(os.getenv("BENCH_DONE_FILE"), "w")
      if f then f:write("done\n"); f:close() end
    end
  elseif status >= 300 then
    answered = answered + 1
    refused[status] = (refused[status] or 0) + 1
  else
    fillers = fillers + 1
  end
end

function done(summary, latency, requests)
  local a, s, n, f, parts = 0, 0, 0, 0, {}
  for _, t in ipairs(threads) do
    a = a + t:get("accepted"); s = s + t:get("sent"); n = n + t:get("answered"); f = f + t:get("fillers")
    for status, count in pairs(t:get("refused")) do
      parts[#parts + 1] = string.format('"%d":%d', status, count)
    end
  end
  io.write(string.format('BENCH_COUNT {"accepted":%d,"sent":%d,"answered":%d,"fillers":%d,"duration_us":%d,"refused":{%s}}\n',
    a, s, n, f, summary.duration, table.concat(parts, ",")))
end
