-- Replace a reservation by the tokens actually used, exactly once: the
-- reservation (or its released marker, or the applied-set entry of an
-- unreserved settlement) is consumed in the same step that applies it.
-- KEYS: budget, period, user, reservations, released, applied (event's period)
-- ARGV: prefix, tag, month index, reservation id, reserved, actual,
--       monthly limit, rollover (0/1), cap, threshold percents (comma list)
local idx, rid = tonumber(ARGV[3]), ARGV[4]
local reserved, actual = tonumber(ARGV[5]), tonumber(ARGV[6])
-- An unreserved settlement (admitted while Redis seemed down) is recorded by
-- id first, whatever else happens: its reserve may still land late under the
-- same id, and a resend must then find the id already applied.
if reserved == 0 and redis.call('SADD', KEYS[6], rid) == 0 then
  return {0}
end
local delta
local entry = redis.call('HGET', KEYS[4], rid)
if entry then
  redis.call('HDEL', KEYS[4], rid)
  delta = actual - tonumber(string.match(entry, '^%d+:(%d+):'))
elseif redis.call('HDEL', KEYS[5], rid) == 1 then
  delta = actual
elseif reserved == 0 then
  delta = actual
else
  return {0}
end
local limit, bonus, grant = open_period(
  KEYS[2], KEYS[3], idx, tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]))
local charged = redis.call('INCRBY', KEYS[1], delta)
local used = redis.call('HINCRBY', KEYS[2], 'u', actual)
local eff = limit + bonus + grant
local closed = redis.call('HGET', KEYS[2], 'x') == '1' and 1 or 0
local out = {1, charged, used, eff, closed}
if eff > 0 and used > 0 then
  for pct in string.gmatch(ARGV[10], '%d+') do
    if used * 100 >= tonumber(pct) * eff and redis.call('HSETNX', KEYS[2], 't' .. pct, 1) == 1 then
      table.insert(out, tonumber(pct))
    end
  end
end
if used > 0 and used >= eff and redis.call('HSETNX', KEYS[2], 'xe', 1) == 1 then
  table.insert(out, -1)
end
return out
