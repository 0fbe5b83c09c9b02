-- Close one ended user-period: mark it closed, write the final bonus of the
-- user's next record from the reconciled usage, and start the retention clock.
-- Closing twice does nothing (the worker publishes period.closed once).
-- KEYS: period record (routes the call to the user's slot)
-- ARGV: prefix, tag, month index, retention seconds (0: keep forever)
local idx, retention = tonumber(ARGV[3]), tonumber(ARGV[4])
local pkey = key('period', idx)
local rec = redis.call('HMGET', pkey, 'l', 'x')
if not rec[1] or rec[2] == '1' then return {0} end
redis.call('HSET', pkey, 'x', 1)
local next_idx, next_bonus = finalise_next(idx)
if retention > 0 then
  redis.call('EXPIRE', pkey, retention)
  redis.call('EXPIRE', key('budget', idx), retention)
  redis.call('EXPIRE', key('done', idx), retention)
end
return {1, summary(idx, next_idx, next_bonus)}
