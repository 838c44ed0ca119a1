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

local key, ttl, id = KEYS[1], tonumber(ARGV[2]), ARGV[3]

redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
if not redis.call('ZSCORE', key, id) then return 0 end
redis.call('ZADD', key, 'XX', fmt(now + ttl), id)
local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', key, math.ceil(tonumber(newest[2]) - now) + GC_MARGIN_MS)
return 1
