-- give_back.lua: what a call gives back when it ends, in one run: unused units to any number of
-- limits, and its concurrency lease.
--
-- KEYS:
--   for each refund i (0-based), KEYS[2i+1] state: token_bucket HASH {t, ts} | sliding_window
--   ZSET (see acquire.lua), KEYS[2i+2] window meta HASH {n, seq} (sliding_window only);
--   then, with a lease, KEYS[2n+1] the lease ZSET
-- ARGV:
--   ARGV[1]  now in ms ("" = Redis TIME)
--   ARGV[2]  n, the number of refunds
--   for each refund i: ARGV[4i+3] kind ("tb" | "sw"), ARGV[4i+4] limit (units), ARGV[4i+5]
--   period (ms), ARGV[4i+6] amount (units >= 0)
--   then, with a lease, ARGV[4n+3] the lease id
-- Returns: the units actually given back, one per refund (integers).
--
-- token_bucket: refill to `now`, then add `amount`, capped at the capacity; an absent bucket is
-- full, so nothing is written.
-- sliding_window: remove `amount` units from the newest live entries (the caller's own charge
-- is among the newest), shrinking the last one partially if needed.
-- The lease: a plain ZREM; an unknown or expired id is a no-op.

local EPS_MS = 1e-3

local member_cost = function(m) return tonumber(string.match(m, ':(%d+)$')) end

local function refund(key, meta, kind, limit, period, amount)
  if amount <= 0 then return 0 end

  if kind == 'tb' then
    local v = redis.call('HMGET', key, 't', 'ts')
    local tokens, ts = tonumber(v[1]), tonumber(v[2])
    if tokens == nil or ts == nil then return 0 end
    local rate = limit / period
    local elapsed = now - ts
    if elapsed < 0 then elapsed = 0 end
    tokens = math.min(limit, tokens + elapsed * rate)
    local after = math.min(limit, tokens + amount)
    redis.call('HSET', key, 't', fmt(after), 'ts', fmt(now))
    redis.call('PEXPIRE', key, math.ceil((limit - after) / rate) + GC_MARGIN_MS)
    return math.floor(after - tokens)
  end

  local cutoff = fmt(now - period + EPS_MS)
  local total = tonumber(redis.call('HGET', meta, 'n') or '0')
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', cutoff)) do
    total = total - member_cost(m)
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', cutoff)
  local left = amount
  while left > 0 do
    local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    if #newest == 0 then break end
    local m, score = newest[1], newest[2]
    local seq, cost = string.match(m, '^(%d+):(%d+)$')
    cost = tonumber(cost)
    redis.call('ZREM', key, m)
    if cost > left then
      redis.call('ZADD', key, score, seq .. ':' .. (cost - left))
      left = 0
    else
      left = left - cost
    end
  end
  local given = amount - left
  if redis.call('ZCARD', key) == 0 then
    redis.call('DEL', key, meta)
  else
    redis.call('HSET', meta, 'n', math.max(0, total - given))
  end
  return given
end

local n = tonumber(ARGV[2])
local given = {}
for i = 0, n - 1 do
  given[i + 1] = refund(
    KEYS[2 * i + 1], KEYS[2 * i + 2],
    ARGV[4 * i + 3], tonumber(ARGV[4 * i + 4]), tonumber(ARGV[4 * i + 5]), tonumber(ARGV[4 * i + 6])
  )
end
if #KEYS > 2 * n then
  redis.call('ZREM', KEYS[2 * n + 1], ARGV[4 * n + 3])
end
return given
