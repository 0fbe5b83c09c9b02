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
-- Settlements of one user-period are summed and applied together, which
-- gives the same counters as applying them one by one.
-- Reply: {results, adjusted}: per entry {applied, charged, used, limit, closed,
--   crossed percents..., -1 when exceeded} (counters after the whole batch;
--   the percents on the first entry of its user-period), for a refusal
--   {first}; adjusted: one summary per closed user-period that received usage.
local percents = {}
for pct in string.gmatch(ARGV[3], '%d+') do table.insert(percents, tonumber(pct)) end

local function remember_id(user)
  -- Hashed tags cannot be decoded: keep the raw id for the events.
  if user ~= '' then redis.call('HSETNX', key('user'), 'id', user) end
end

-- Consume the entry that makes a settlement apply once; nil if already applied.
local function consume(idx, rid, reserved, actual)
  -- Unreserved ids are recorded first: a late reserve under the same id must
  -- not let a resend apply twice (see settle.lua).
  if reserved == 0 and redis.call('SADD', key('done', idx), rid) == 0 then
    return nil
  end
  local rkey = key('resv')
  local entry = redis.call('HGET', rkey, rid)
  if entry then
    redis.call('HDEL', rkey, rid)
    return actual - tonumber(string.match(entry, '^%d+:(%d+):'))
  elseif redis.call('HDEL', key('rel'), rid) == 1 then
    return actual
  elseif reserved == 0 then
    return actual
  end
  return nil
end

-- Apply the summed settlements of one user-period (one INCRBY, one HINCRBY:
-- the speed of a batch comes from here) and report newly crossed thresholds.
local function apply_group(g)
  TAG = g.tag
  local pkey = key('period', g.idx)
  -- One read for the record and its closed flag (each call costs microseconds).
  local rec = redis.call('HMGET', pkey, 'l', 'b', 'g', 'x')
  local l, b, gr = n(rec[1]), n(rec[2]), n(rec[3])
  if not rec[1] then
    l, b, gr = open_period(pkey, key('user'), g.idx, g.limit, g.rollover, g.cap)
  end
  -- int(): exact integer text, whatever the size.
  local charged = redis.call('INCRBY', key('budget', g.idx), int(g.delta))
  local used = redis.call('HINCRBY', pkey, 'u', int(g.actual))
  local eff = l + b + gr
  local closed = rec[4] == '1' and 1 or 0
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
  remember_id(g.user)
  return out
end

local results, groups, order = {}, {}, {}
for i, e in ipairs(cjson.decode(ARGV[4])) do
  TAG = e[2]
  local idx = e[3]
  if e[1] == 'r' then
    results[i] = {redis.call('HSETNX', key('period', idx), 'xe', 1)}
  else
    local delta = consume(idx, e[4], e[5], e[6])
    if delta == nil then
      results[i] = {0}
    else
      local k = TAG .. '\0' .. idx
      local g = groups[k]
      if not g then
        g = {tag = TAG, idx = idx, delta = 0, actual = 0, limit = e[7], rollover = e[8],
             cap = e[9], user = e[10], entries = {}}
        groups[k] = g
        table.insert(order, k)
      end
      g.delta, g.actual = g.delta + delta, g.actual + e[6]
      table.insert(g.entries, i)
    end
  end
end
local adjusted = {}
for _, k in ipairs(order) do
  local g = groups[k]
  local out = apply_group(g)
  -- Events once per group: the first entry carries the crossed thresholds.
  results[g.entries[1]] = out
  for j = 2, #g.entries do results[g.entries[j]] = {1, out[2], out[3], out[4], out[5]} end
  if out[5] == 1 then
    local next_idx, next_bonus = finalise_next(g.idx)
    table.insert(adjusted, summary(g.idx, next_idx, next_bonus))
  end
end
return {results, adjusted}
