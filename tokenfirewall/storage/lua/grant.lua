-- One-off top-up: add tokens to field `g` of a user-period record, which
-- reserve.lua adds to the effective limit. The app's policy is not known here,
-- so a missing record is created only when the caller passes one; open_period
-- then applies the override and provisional bonus exactly as reserve.lua does.
-- A closed record is refused: its final bonus chain would need recomputing.
-- KEYS: period record, user hash (same user)
-- ARGV: prefix, tag, month index, tokens,
--       monthly limit ('': the record must exist), rollover (0/1), cap
-- Reply: {1, granted total, monthly limit, bonus}, {0} no record, {-1} closed
local idx, tokens = tonumber(ARGV[3]), ARGV[4]
local rec = redis.call('HMGET', KEYS[1], 'l', 'x')
if rec[2] == '1' then return {-1} end
if not rec[1] then
  if ARGV[5] == '' then return {0} end
  open_period(KEYS[1], KEYS[2], idx, tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]))
end
local granted = redis.call('HINCRBY', KEYS[1], 'g', tokens)
local now = redis.call('HMGET', KEYS[1], 'l', 'b')
return {1, granted, n(now[1]), n(now[2])}
