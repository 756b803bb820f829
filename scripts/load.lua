-- wrk script for scripts/load.sh: POST /orders with a ~200-byte JSON order.
--
-- Usage: wrk ... -s scripts/load.lua http://127.0.0.1:PORT/orders -- SCENARIO [KEY]
--   miss     every request has its own Idempotency-Key (the first request of each key)
--   replay   every request has the same key: KEY, else one of this run's own (then the first
--            request executes and the rest replay it; on a store slower than the handler, the
--            first requests of the other connections find it in flight: 409). scripts/load.sh
--            passes its warm-up's key, so that a measured run is replays only.
--   no_key   no Idempotency-Key (the layer lets it through)

local body = '{"customer":"cus_8f14e45fceea167a","currency":"eur","items":[{"sku":"A1-RED-42","quantity":2,"unit_price":1999},{"sku":"B7-BLUE-40","quantity":1,"unit_price":4999}],"shipping":{"method":"standard","country":"FR"}}'

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

local scenario, prefix, counter, fixed

local function headers(key)
  local h = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer sk_test_4eC39HqLyjWDarjtT1zdp7dc",
  }
  if key then
    h["Idempotency-Key"] = key
  end
  return h
end

function init(args)
  scenario = args[1] or "miss"
  -- Unique per run and per thread, so no two requests of a miss run share a key.
  prefix = string.format("load-%d-%d-%d-", os.time(), math.random(1e9), id or 0)
  counter = 0
  if scenario == "replay" then
    fixed = wrk.format("POST", nil, headers(args[2] or (prefix .. "replayed")), body)
  elseif scenario == "no_key" then
    fixed = wrk.format("POST", nil, headers(nil), body)
  elseif scenario ~= "miss" then
    error("unknown scenario " .. scenario)
  end
end

function request()
  if fixed then
    return fixed
  end
  counter = counter + 1
  return wrk.format("POST", nil, headers(prefix .. counter), body)
end
