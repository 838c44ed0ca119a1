-- block.lua: block a key until now + duration; never shortens an existing block.
--
-- KEYS:
--   KEYS[1]  block: STRING holding the blocked-until time (ms)
-- ARGV:
--   ARGV[1]  now in ms ("" = Redis TIME)
--   ARGV[2]  duration (ms, > 0)
-- Returns: the time left on the block after this call (ms, string).
--
-- The value, not the TTL, decides (so every script judges it by the same clock); the TTL only
-- collects the key once the block is over.

local until_ms = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now + tonumber(ARGV[2]))
redis.call('SET', KEYS[1], fmt(until_ms), 'PX', math.ceil(until_ms - now) + GC_MARGIN_MS)
return fmt(until_ms - now)
