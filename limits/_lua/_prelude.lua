-- _prelude.lua: put before every script by `redis_backend._load_lua` (Redis scripts cannot
-- include one another).
--
-- ARGV[1] of every script is `now` in ms: "" means Redis TIME (the production clock, shared by
-- every process and host); a number is a test's clock.

if redis.replicate_commands then redis.replicate_commands() end

local GC_MARGIN_MS = 1000  -- a key's TTL past the moment its state stops mattering

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local fmt = function(x) return string.format('%.17g', x) end

