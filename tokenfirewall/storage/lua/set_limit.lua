-- Set or clear a user's monthly limit override (user hash field `o`) and apply
-- it at once to one period record, in one step. reserve.lua reads the limit
-- stored in the record, so without the second half an override would only
-- take effect at the next period. The record's own limit is kept in `lo` the
-- first time it is overridden, so clearing the override restores it.
-- KEYS: user hash, period record (same user)
-- ARGV: prefix, tag, new limit ('' clears the override)
-- Reply: {limit now in the record (-1: no open record), previous override (-1: none)}
local ukey, pkey, limit = KEYS[1], KEYS[2], ARGV[3]
local prev = redis.call('HGET', ukey, 'o')
prev = prev and tonumber(prev) or -1
if limit == '' then
  redis.call('HDEL', ukey, 'o')
else
  redis.call('HSET', ukey, 'o', limit)
end
local rec = redis.call('HMGET', pkey, 'l', 'x', 'lo')
-- A closed record is history: its bonus chain is final, leave it alone.
if not rec[1] or rec[2] == '1' then return {-1, prev} end
if limit == '' then
  if rec[3] then
    redis.call('HSET', pkey, 'l', rec[3])
    redis.call('HDEL', pkey, 'lo')
  end
else
  if not rec[3] then redis.call('HSET', pkey, 'lo', rec[1]) end
  redis.call('HSET', pkey, 'l', limit)
end
return {n(redis.call('HGET', pkey, 'l')), prev}
