-- wrk script for loadtest/bench.py case (f): a different bearer token on every request.
--
--   wrk ... --script wrk_tokens.lua URL -- TOKEN_FILE FIRST
--
-- TOKEN_FILE holds one token a line; requests take them in order from line FIRST + 1 (0-based FIRST,
-- so the measured run can start where the warm-up stopped), wrapping around at the end. Every request
-- is built once in init() (wrk.format with the -H headers plus "authorization: Bearer <token>"), so
-- request() only returns a prebuilt string: wrk shares a core with Envoy in the bench.
--
-- The report is wrk_report.lua's WRK_REPORT line plus "sent": requests written (completed ones and those
-- still in flight when wrk stopped), which is how many tokens the run used. Assumes one wrk thread
-- (bench.py's setting): each thread would otherwise send the same tokens.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk_report.lua")
local report = done

local threads = {}
local requests_built = {}
local count = 0
local next_index = 1
sent = 0 -- global: done() reads it from the thread with thread:get("sent")

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local path, first = args[1], tonumber(args[2] or "0")
   local marker = "TOKEN-GOES-HERE"
   local template = wrk.format(nil, nil, { ["authorization"] = "Bearer " .. marker })
   local at = template:find(marker, 1, true)
   local head, tail = template:sub(1, at - 1), template:sub(at + #marker)
   for token in io.lines(path) do
      count = count + 1
      requests_built[count] = head .. token .. tail
   end
   if count == 0 then
      error("no tokens in " .. path)
   end
   next_index = first % count + 1
end

function request()
   local built = requests_built[next_index]
   next_index = next_index % count + 1
   sent = sent + 1
   return built
end

function done(summary, latency, requests)
   local total = 0
   for _, thread in ipairs(threads) do
      total = total + thread:get("sent")
   end
   report(summary, latency, requests, { sent = total })
end
