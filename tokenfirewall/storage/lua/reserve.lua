-- Pre-check: charge the estimate if it fits the effective limit, else nothing.
-- KEYS: budget, period, user, reservations (of the request's period)
-- ARGV: prefix, tag, month index, estimate, reservation id, expiry ms,
--       monthly limit, rollover (0/1), cap
local idx, est = tonumber(ARGV[3]), tonumber(ARGV[4])
local limit, bonus, grant = open_period(
  KEYS[2], KEYS[3], idx, tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]))
local eff = limit + bonus + grant
local charged = n(redis.call('GET', KEYS[1]))
-- A client retry of a reserve that already ran must not charge it twice.
if redis.call('HEXISTS', KEYS[4], ARGV[5]) == 1 then
  return {1, charged, eff, limit, bonus, 0}
end
if charged + est > eff then
  local first = redis.call('HSETNX', KEYS[2], 'xr', 1)
  return {0, charged, eff, limit, bonus, first}
end
charged = redis.call('INCRBY', KEYS[1], est)
redis.call('HSET', KEYS[4], ARGV[5], int(idx) .. ':' .. int(est) .. ':' .. ARGV[6])
return {1, charged, eff, limit, bonus, 0}
