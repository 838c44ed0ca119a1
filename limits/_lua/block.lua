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

if redis.replicate_commands then redis.replicate_commands() end

local GC_MARGIN_MS = 1000

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local fmt = function(x) return string.format('%.17g', x) end

local until_ms = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now + tonumber(ARGV[2]))
redis.call('SET', KEYS[1], fmt(until_ms), 'PX', math.ceil(until_ms - now) + GC_MARGIN_MS)
return fmt(until_ms - now)
