-- Apply many usage entries in one call, by settle.lua's rules: each settlement
-- consumes its reservation (or released marker, or applied-set entry) in the
-- same step that applies it, so redelivery changes nothing. A settlement for a
-- closed period finalises the next bonus again, in the same step too, so a
-- worker killed right after this script leaves no stale bonus behind.
-- KEYS: none on a single node; on a cluster, one key of the (single) user.
-- ARGV: prefix, '' (tags come per entry), threshold percents (comma list),
--   the entries as one JSON array (one decode in C instead of thousands of
--   arguments), each [kind ('s' settled, 'r' refused), tag, month index, id,
--   reserved, actual, monthly limit, rollover, cap, raw user id (only for
--   hashed tags, '' otherwise)].
-- Reply: {results, adjusted}: per entry {applied, charged, used, limit, closed,
--   crossed percents..., -1 when exceeded}, for a refusal {first}; adjusted:
--   one summary per closed user-period that received usage.
local percents = {}
for pct in string.gmatch(ARGV[3], '%d+') do table.insert(percents, tonumber(pct)) end

local function remember_id(user)
  -- Hashed tags cannot be decoded: keep the raw id for the events.
  if user ~= '' then redis.call('HSETNX', key('user'), 'id', user) end
end

local function settle_one(idx, rid, reserved, actual, limit, rollover, cap)
  local rkey = key('resv')
  local delta
  local entry = redis.call('HGET', rkey, rid)
  if entry then
    redis.call('HDEL', rkey, rid)
    delta = actual - tonumber(string.match(entry, '^%d+:(%d+):'))
  elseif redis.call('HDEL', key('rel'), rid) == 1 then
    delta = actual
  elseif reserved == 0 and redis.call('SADD', key('done', idx), rid) == 1 then
    delta = actual
  else
    return {0}
  end
  local pkey = key('period', idx)
  local l, b, g = open_period(pkey, key('user'), idx, limit, rollover, cap)
  -- int(): Lua would format large numbers in exponent notation.
  local charged = redis.call('INCRBY', key('budget', idx), int(delta))
  local used = redis.call('HINCRBY', pkey, 'u', int(actual))
  local eff = l + b + g
  local closed = redis.call('HGET', pkey, 'x') == '1' and 1 or 0
  local out = {1, charged, used, eff, closed}
  if eff > 0 and used > 0 then
    for _, pct in ipairs(percents) do
      if used * 100 >= pct * eff and redis.call('HSETNX', pkey, 't' .. pct, 1) == 1 then
        table.insert(out, pct)
      end
    end
  end
  if used > 0 and used >= eff and redis.call('HSETNX', pkey, 'xe', 1) == 1 then
    table.insert(out, -1)
  end
  return out
end

local results, late, late_order = {}, {}, {}
for _, e in ipairs(cjson.decode(ARGV[4])) do
  TAG = e[2]
  local idx = e[3]
  if e[1] == 'r' then
    table.insert(results, {redis.call('HSETNX', key('period', idx), 'xe', 1)})
  else
    local out = settle_one(idx, e[4], e[5], e[6], e[7], e[8], e[9])
    if out[1] == 1 then
      remember_id(e[10])
      if out[5] == 1 then
        local k = TAG .. '\0' .. idx
        if not late[k] then late[k] = {TAG, idx}; table.insert(late_order, k) end
      end
    end
    table.insert(results, out)
  end
end
local adjusted = {}
for _, k in ipairs(late_order) do
  TAG = late[k][1]
  local next_idx, next_bonus = finalise_next(late[k][2])
  table.insert(adjusted, summary(late[k][2], next_idx, next_bonus))
end
return {results, adjusted}
