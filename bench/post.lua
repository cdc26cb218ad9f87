-- wrk script of bench.ingest: POST one webhook body, count answers, keep the event ids answered.
--
-- Configured through the environment (set by bench/ingest.py):
--   BENCH_BODY_FILE  the body to POST (sent byte for byte, Content-Type: application/json)
--   BENCH_PATH       path and query, e.g. /webhooks/rdstation?token=...
--   BENCH_IDS_FILE   optional: where done() writes the "id" of every 2xx answer, one per line
-- done() prints one machine-readable line starting with "BENCH " (latencies in microseconds).

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
  local body = f:read("*a")
  f:close()
  collect = os.getenv("BENCH_IDS_FILE") ~= nil and os.getenv("BENCH_IDS_FILE") ~= ""
  req = wrk.format("POST", os.getenv("BENCH_PATH"), {["Content-Type"] = "application/json"}, body)
  ok, other = 0, 0
  ids = {}
end

function request()
  return req
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
    if collect then
      ids[#ids + 1] = string.match(body, '"id":"([^"]*)"') or "?"
    end
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local total_ok, total_other = 0, 0
  local out = nil
  local path = os.getenv("BENCH_IDS_FILE")
  if path ~= nil and path ~= "" then
    out = assert(io.open(path, "w"))
  end
  for _, thread in ipairs(threads) do
    total_ok = total_ok + thread:get("ok")
    total_other = total_other + thread:get("other")
    if out then
      for _, id in ipairs(thread:get("ids")) do
        out:write(id, "\n")
      end
    end
  end
  if out then
    out:close()
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d ok=%d other=%d non2xx3xx=%d connect=%d read=%d " ..
    "write=%d timeout=%d mean_us=%.1f p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, total_ok, total_other, e.status, e.connect, e.read,
    e.write, e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
