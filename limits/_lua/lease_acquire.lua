-- lease_acquire.lua: take (or re-take) one of `limit` concurrent slots.
--
-- KEYS:
--   KEYS[1]  leases: ZSET, member = lease id, score = expiry time (ms)
--   KEYS[2]  block: STRING holding the blocked-until time (ms), see acquire.lua
-- ARGV:
--   ARGV[1]  now in ms ("" = Redis TIME)
--   ARGV[2]  limit (slots)
--   ARGV[3]  ttl (ms)
--   ARGV[4]  lease id
-- Returns: {allowed (1|0), retry_ms (string), remaining (integer), reset_ms (string)}
--   reset_ms = time until every current lease has expired.
--
-- Expired leases (score <= now) are dropped first, so a crashed holder frees its slot at its
-- expiry. Re-acquiring a lease id already held renews it and always succeeds (unless blocked).

if redis.replicate_commands then redis.replicate_commands() end

local GC_MARGIN_MS = 1000

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local key, block = KEYS[1], KEYS[2]
local limit, ttl, id = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local fmt = function(x) return string.format('%.17g', x) end

redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))

local allowed, retry = 0, 0
local until_ms = tonumber(redis.call('GET', block) or '0')
if until_ms > now then
  retry = until_ms - now
elseif redis.call('ZSCORE', key, id) or redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, fmt(now + ttl), id)
  allowed = 1
else
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  retry = tonumber(oldest[2]) - now
end

local count = redis.call('ZCARD', key)
local reset = 0
if count > 0 then
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  reset = tonumber(newest[2]) - now
  redis.call('PEXPIRE', key, math.ceil(reset) + GC_MARGIN_MS)
end
local remaining = math.max(0, limit - count)
if until_ms > now then
  remaining = 0
  reset = math.max(reset, until_ms - now)
end
return {allowed, fmt(retry), remaining, fmt(reset)}
