-- lease_renew.lua: push a held lease's expiry to now + ttl.
--
-- KEYS:
--   KEYS[1]  leases: ZSET, member = lease id, score = expiry time (ms)
-- ARGV:
--   ARGV[1]  now in ms ("" = Redis TIME)
--   ARGV[2]  ttl (ms)
--   ARGV[3]  lease id
-- Returns: 1 if the lease was held and is renewed, 0 if it had expired or was released
-- (its slot may already belong to someone else; the holder must stop or re-acquire).

if redis.replicate_commands then redis.replicate_commands() end

local GC_MARGIN_MS = 1000

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local key, ttl, id = KEYS[1], tonumber(ARGV[2]), ARGV[3]
local fmt = function(x) return string.format('%.17g', x) end

redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
if not redis.call('ZSCORE', key, id) then return 0 end
redis.call('ZADD', key, 'XX', fmt(now + ttl), id)
local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', key, math.ceil(tonumber(newest[2]) - now) + GC_MARGIN_MS)
return 1
