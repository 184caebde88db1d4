-- wrk script for loadtest/bench.py: prints one machine-readable line at the end of a run.
--
--   WRK_REPORT {"requests":N,"duration_us":N,"bytes":N,"connect_errors":N,"read_errors":N,
--               "write_errors":N,"status_errors":N,"timeouts":N,"p50_us":N,"p90_us":N,"p99_us":N,
--               "p999_us":N,"max_us":N,"mean_us":N}
--
-- status_errors is wrk's count of responses with a status above 399 (every deny or error this service
-- or Envoy produces: 401/403/429/503). It is counted in C, so no per-response Lua callback slows wrk
-- down (wrk shares a core with Envoy in the bench). bench.py also takes the exact non-2xx count from
-- Envoy's own downstream_rq_* counters.
--
-- Extra request headers come from the command line (wrk -H), not from this script. A script that loads
-- this one (wrk_tokens.lua) may call done() with a fourth argument, a table of integer fields to add.

done = function(summary, latency, requests, extra)
   local e = summary.errors
   local more = ""
   for name, value in pairs(extra or {}) do
      more = more .. string.format(',"%s":%d', name, value)
   end
   io.write(string.format(
      'WRK_REPORT {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
      '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
      '"p999_us":%d,"max_us":%d,"mean_us":%.1f%s}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
      e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max, latency.mean, more))
end
