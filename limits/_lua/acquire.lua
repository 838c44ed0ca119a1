-- acquire.lua: check N limits and charge all of them or none, atomically.
--
-- KEYS (3 per spec, spec i = 1..N, all sharing one {hash-tag}):
--   KEYS[3i-2]  state: token_bucket -> HASH {t = tokens (float), ts = last refill (ms)}
--                      sliding_window -> ZSET, member "<seq>:<cost>", score = admission time (ms)
--                      concurrency -> ZSET, member = lease id, score = lease expiry (ms)
--   KEYS[3i-1]  window meta (sliding_window only): HASH {n = sum of live costs, seq = counter}
--   KEYS[3i]    block: STRING holding the blocked-until time (ms)
-- ARGV:
--   ARGV[1]  now in ms ("" = use Redis TIME, the production clock)
--   ARGV[2]  N
--   then per spec 4 values: kind ("tb" | "sw" | "cc"), limit (units, or slots), period (ms; a
--   lease's TTL for "cc"), cost (units >= 0; 1 for "cc")
--   ARGV[3 + 4N]  the lease id a "cc" spec takes a slot for (at most one "cc" spec)
-- Units: time in milliseconds (float, microsecond resolution), amounts in whole units.
-- Returns: {allowed (1|0), violated (1-based spec index, 0 if none), retry_ms (string),
--           then per spec: remaining (integer), reset_ms (string)}
--   retry_ms is "-1" when the call can never be admitted (cost > limit).
--
-- A concurrency spec fits when its lease id already holds a slot (re-taking it renews it) or a
-- slot is free; its wait is until the oldest lease expires.
--
-- A rejection writes nothing except dropping expired window entries and leases (not a charge).
-- TTLs are garbage collection only: every decision is made from stored values and `now`,
-- so a key that expired early is indistinguishable from a full bucket / empty window.

local EPS_UNITS = 1e-6   -- float slack on token comparisons; far below one token
local EPS_MS = 1e-3      -- one microsecond: the resolution of Redis TIME

local n = tonumber(ARGV[2])
local lease_id = ARGV[3 + 4 * n]
local member_cost = function(m) return tonumber(string.match(m, ':(%d+)$')) end

-- Load spec i, apply refill / expiry, return a table describing it.
local function load(i)
  local base = 2 + (i - 1) * 4
  local s = {
    kind = ARGV[base + 1],
    limit = tonumber(ARGV[base + 2]),
    period = tonumber(ARGV[base + 3]),
    cost = tonumber(ARGV[base + 4]),
    key = KEYS[3 * i - 2],
    meta = KEYS[3 * i - 1],
    block = KEYS[3 * i],
  }
  if s.kind == 'tb' then
    s.rate = s.limit / s.period  -- units per ms
    local v = redis.call('HMGET', s.key, 't', 'ts')
    local tokens, ts = tonumber(v[1]), tonumber(v[2])
    if tokens == nil or ts == nil then
      tokens = s.limit
    else
      local elapsed = now - ts
      if elapsed < 0 then elapsed = 0 end  -- clock stepped back: no refill, never negative
      tokens = math.min(s.limit, tokens + elapsed * s.rate)
    end
    s.tokens = tokens
    s.fits = tokens + EPS_UNITS >= s.cost
    if not s.fits then s.wait = (s.cost - tokens) / s.rate end
  elseif s.kind == 'cc' then
    redis.call('ZREMRANGEBYSCORE', s.key, '-inf', fmt(now))
    s.count = redis.call('ZCARD', s.key)
    s.held = redis.call('ZSCORE', s.key, lease_id) ~= false
    s.fits = s.held or s.count < s.limit
    if not s.fits then
      local oldest = redis.call('ZRANGE', s.key, 0, 0, 'WITHSCORES')
      s.wait = tonumber(oldest[2]) - now
    end
  else
    local cutoff = now - s.period + EPS_MS
    local total = tonumber(redis.call('HGET', s.meta, 'n') or '0')
    local expired = redis.call('ZRANGEBYSCORE', s.key, '-inf', fmt(cutoff))
    if #expired > 0 then
      for _, m in ipairs(expired) do total = total - member_cost(m) end
      redis.call('ZREMRANGEBYSCORE', s.key, '-inf', fmt(cutoff))
      if redis.call('ZCARD', s.key) == 0 then
        redis.call('DEL', s.key, s.meta)
        total = 0
      else
        redis.call('HSET', s.meta, 'n', total)
      end
    elseif total ~= 0 and redis.call('EXISTS', s.key) == 0 then
      total = 0  -- the log expired before its meta: trust the log
    end
    s.total = total
    s.fits = total + s.cost <= s.limit
    if not s.fits then
      -- walk from the oldest entry until enough cost has expired
      local need = total + s.cost - s.limit
      local freed, start = 0, 0
      while s.wait == nil do
        local batch = redis.call('ZRANGE', s.key, start, start + 99, 'WITHSCORES')
        if #batch == 0 then break end
        for j = 1, #batch, 2 do
          freed = freed + member_cost(batch[j])
          if freed >= need then
            s.wait = tonumber(batch[j + 1]) + s.period - now
            break
          end
        end
        start = start + 100
      end
      if s.wait == nil then s.wait = s.period end  -- meta out of step with the log: be safe
    end
  end
  if s.cost > s.limit then
    s.fits = false
    s.wait = -1
  end
  local until_ms = tonumber(redis.call('GET', s.block) or '0')
  s.blocked_ms = 0
  if until_ms > now then
    s.blocked_ms = until_ms - now
    s.fits = false
    if s.wait ~= -1 then s.wait = math.max(s.wait or 0, s.blocked_ms) end
  end
  return s
end

local specs = {}
local allowed = true
for i = 1, n do
  specs[i] = load(i)
  if not specs[i].fits then allowed = false end
end

local violated, retry = 0, 0
if allowed then
  for i = 1, n do
    local s = specs[i]
    if s.cost > 0 then
      if s.kind == 'tb' then
        s.tokens = math.max(0, s.tokens - s.cost)
        redis.call('HSET', s.key, 't', fmt(s.tokens), 'ts', fmt(now))
        redis.call('PEXPIRE', s.key, math.ceil((s.limit - s.tokens) / s.rate) + GC_MARGIN_MS)
      elseif s.kind == 'cc' then
        redis.call('ZADD', s.key, fmt(now + s.period), lease_id)
        if not s.held then s.count = s.count + 1 end
        local newest = redis.call('ZRANGE', s.key, -1, -1, 'WITHSCORES')
        redis.call('PEXPIRE', s.key, math.ceil(tonumber(newest[2]) - now) + GC_MARGIN_MS)
      else
        local seq = redis.call('HINCRBY', s.meta, 'seq', 1)
        redis.call('ZADD', s.key, fmt(now), seq .. ':' .. s.cost)
        s.total = redis.call('HINCRBY', s.meta, 'n', s.cost)
        local ttl = math.ceil(s.period) + GC_MARGIN_MS
        redis.call('PEXPIRE', s.key, ttl)
        redis.call('PEXPIRE', s.meta, ttl)
      end
    end
  end
else
  -- the binding constraint is the one that forces the longest wait; "never" beats any wait;
  -- a full concurrency spec only when no other spec refuses
  for pass = 1, 2 do
    for i = 1, n do
      local w = specs[i].wait
      if w ~= nil and not specs[i].fits and (specs[i].kind == 'cc') == (pass == 2) then
        if w == -1 then
          if retry ~= -1 then violated, retry = i, -1 end
        elseif retry ~= -1 and (violated == 0 or w > retry) then
          violated, retry = i, w
        end
      end
    end
    if violated ~= 0 then break end
  end
end

local out = {allowed and 1 or 0, violated, fmt(retry)}
for i = 1, n do
  local s = specs[i]
  local remaining, reset
  if s.kind == 'tb' then
    remaining = math.floor(s.tokens + EPS_UNITS)
    reset = (s.limit - s.tokens) / s.rate
  elseif s.kind == 'cc' then
    remaining = math.max(0, s.limit - s.count)
    reset = 0
    local newest = redis.call('ZRANGE', s.key, -1, -1, 'WITHSCORES')
    if #newest > 0 then reset = math.max(0, tonumber(newest[2]) - now) end
  else
    remaining = math.max(0, s.limit - s.total)
    reset = 0
    local newest = redis.call('ZRANGE', s.key, -1, -1, 'WITHSCORES')
    if #newest > 0 then reset = math.max(0, tonumber(newest[2]) + s.period - now) end
  end
  if s.blocked_ms > 0 then
    remaining = 0
    reset = math.max(reset, s.blocked_ms)
  end
  out[#out + 1] = remaining
  out[#out + 1] = fmt(reset)
end
return out
