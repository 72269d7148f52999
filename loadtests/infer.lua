-- wrk script: POST one Open Inference Protocol JSON body, count non-2xx responses, print a JSON
-- summary line for loadtests/wrk.py.
--
-- Environment (read when the script loads, because wrk decides whether delay() exists then):
--   INFER_BODY  file holding the JSON request body (required)
--   INFER_RATE  requests/s for each connection; unset or 0 = closed loop
--   INFER_SEED  base seed of the exponential inter-arrival times (default 1)
--
-- Run one connection per thread (wrk -t N -c N): wrk's Lua state is per thread and its callbacks do
-- not say which connection they serve, so only then can a response be matched with its request.
-- Latencies are timed here, exactly, because wrk's own percentiles include synthetic samples (its
-- stats_correct) that it adds for every response slower than twice the mean interval.
-- Closed loop: latency from the send. Open loop: each connection sends at the times of its own
-- Poisson process, and a send that is late because the previous response had not arrived counts
-- the wait in its latency (wrk2-style correction for coordinated omission).

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } infer_timespec;
int clock_gettime(int clk_id, infer_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("infer_timespec")

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

local function read_file(path)
  local f = assert(io.open(path, "rb"), "INFER_BODY: cannot open " .. tostring(path))
  local data = f:read("*a")
  f:close()
  return data
end

wrk.method = "POST"
wrk.body = read_file(assert(os.getenv("INFER_BODY"), "INFER_BODY is not set"))
wrk.headers["Content-Type"] = "application/json"

local rate = tonumber(os.getenv("INFER_RATE") or "0") or 0
local base_seed = tonumber(os.getenv("INFER_SEED") or "1") or 1

-- Per-thread globals, read back by done() through thread:get.
non2xx = 0
first_error = ""
lat = {}

local threads = {}
local req = nil
local sent_at = 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("seed", base_seed * 1000 + #threads)
end

function init(args)
  math.randomseed(seed or base_seed)
  req = wrk.format()
end

local function count(status, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if first_error == "" then
      first_error = tostring(status) .. " " .. string.sub(body or "", 1, 200)
    end
  end
end

if rate > 0 then
  local mean_gap_us = 1e6 / rate
  local next_at = nil
  local due_at = 0

  local function gap()
    return -math.log(1 - math.random()) * mean_gap_us
  end

  function delay()
    local now = now_us()
    if next_at == nil then
      next_at = now + gap()  -- a random phase, so connections do not start in step
    end
    -- wrk's timers have whole milliseconds: round down, then wait in the event loop (≤ 1 ms early).
    local wait_ms = (next_at - now) / 1000
    if wait_ms < 1 then
      return 0
    end
    return math.floor(wait_ms)
  end

  function request()
    -- wrk calls this once at start-up to inspect the request: that call must not move the clock.
    if next_at ~= nil then
      due_at, sent_at = next_at, now_us()
      next_at = next_at + gap()
    end
    return req
  end

  function response(status, headers, body)
    -- From the scheduled time when late; from the actual send when the timer fired early.
    lat[#lat + 1] = now_us() - math.min(due_at, sent_at)
    count(status, body)
  end
else
  function request()
    sent_at = now_us()
    return req
  end

  function response(status, headers, body)
    lat[#lat + 1] = now_us() - sent_at
    count(status, body)
  end
end

local function quantile(sorted, q)
  local n = #sorted
  if n == 0 then
    return -1
  end
  local i = math.max(1, math.min(n, math.ceil(q * n)))
  return sorted[i]
end

local function json_string(s)
  s = string.gsub(s, '[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. s .. '"'
end

function done(summary, latency, requests)
  local bad, err = 0, ""
  local all = {}
  for _, thread in ipairs(threads) do
    bad = bad + (thread:get("non2xx") or 0)
    local e = thread:get("first_error") or ""
    if err == "" then
      err = e
    end
    local l = thread:get("lat")
    if l then
      for i = 1, #l do
        all[#all + 1] = l[i]
      end
    end
  end
  table.sort(all)
  local e = summary.errors
  local out = {
    string.format('"duration_us":%d', summary.duration),
    string.format('"requests":%d', summary.requests),
    string.format('"bytes":%d', summary.bytes),
    string.format('"non2xx":%d', bad),
    string.format('"connect_errors":%d', e.connect),
    string.format('"read_errors":%d', e.read),
    string.format('"write_errors":%d', e.write),
    string.format('"timeouts":%d', e.timeout),
    string.format('"latency_mean_us":%.1f', latency.mean),
    string.format('"latency_max_us":%d', latency.max),
    string.format('"wrk_p50_us":%d', latency:percentile(50.0)),
    string.format('"wrk_p99_us":%d', latency:percentile(99.0)),
    string.format('"latency_count":%d', #all),
    string.format('"p50_us":%.1f', quantile(all, 0.5)),
    string.format('"p99_us":%.1f', quantile(all, 0.99)),
    string.format('"p999_us":%.1f', quantile(all, 0.999)),
    '"first_error":' .. json_string(err),
  }
  io.write("INFER_JSON {" .. table.concat(out, ",") .. "}\n")
end
