-- Apply many usage entries in one call, by settle.lua's rules: each settlement
-- consumes its reservation (or released marker, or applied-set entry) in the
-- same step that applies it, so redelivery changes nothing. A settlement for a
-- closed period finalises the next bonus again, in the same step too, so a
-- worker killed right after this script leaves no stale bonus behind.
-- KEYS: none on a single node; on a cluster, one key of the (single) user.
-- ARGV (flat, no JSON: decoding nested tables cost more than the updates):
--   prefix, '' (tags come per user), threshold percents (comma list),
--   R (refusals), R x [tag, period name],
--   then users until the end, each [tag, raw user id (only for hashed tags,
--   '' otherwise), P, P x period], a period being
--   [period name, month index, monthly limit, rollover (0/1), cap, K,
--    K x [reservation id, reserved, actual]].
-- Settlements of one user-period are summed and applied together (one INCRBY,
-- one HINCRBY), which gives the same counters as applying them one by one.
-- A user's reservations are consumed with one HMGET and one HDEL when the
-- call holds several of them (one HDEL each otherwise).
-- Reply: {firsts, groups, adjusted}: firsts, per refusal, 1 if it was the
--   first of its user-period; groups, flat, per user-period either 0 (nothing
--   applied: all redelivered) or applied count, used, effective limit, closed,
--   F, F crossed percents (-1: exceeded) (counters after the group);
--   adjusted: one summary per closed user-period that received usage.
local call = redis.call
local percents = {}
for pct in string.gmatch(ARGV[3], '%d+') do table.insert(percents, tonumber(pct)) end

-- Reserved ids of a user from this many on: one HMGET and one HDEL for all.
local MULTI = 3

-- Consume the user's reservations among `rids` at once; returns the set held.
local function take_all(rkey, rids)
  local held = {}
  for s = 1, #rids, 1000 do  -- bounded unpack
    local chunk = {unpack(rids, s, math.min(s + 999, #rids))}
    local values = call('HMGET', rkey, unpack(chunk))
    local gone = {}
    for i = 1, #chunk do
      if values[i] and not held[chunk[i]] then
        held[chunk[i]] = true
        gone[#gone + 1] = chunk[i]
      end
    end
    if #gone > 0 then call('HDEL', rkey, unpack(gone)) end
  end
  return held
end

-- The amount a settlement adds to `charged`, consuming what makes it apply
-- once; nil if it was applied already. `held`: reservations taken by take_all.
local function consume(rkey, held, tag, pn, rid, reserved, actual)
  if reserved > 0 then
    -- The message carries the amount its reservation holds (the middleware
    -- publishes what it reserved): one HDEL both tests and consumes.
    if held then
      if held[rid] then
        held[rid] = nil  -- the same id twice in a batch applies once
        return actual - reserved
      end
    elseif call('HDEL', rkey, rid) == 1 then
      return actual - reserved
    end
  else
    -- Unreserved ids are recorded first, whatever else happens: the reserve
    -- may still land late under the same id (with an amount this message
    -- does not know), and a resend must then find the id already applied.
    if call('SADD', PREFIX .. ':done:{' .. tag .. '}:' .. pn, rid) == 0 then return nil end
    local entry = call('HGET', rkey, rid)
    if entry then
      call('HDEL', rkey, rid)
      return actual - tonumber(string.match(entry, '^%d+:(%d+):'))
    end
  end
  -- Released on expiry (its tokens were given back): the full usage counts.
  if call('HDEL', PREFIX .. ':rel:{' .. tag .. '}', rid) == 1 or reserved == 0 then
    return actual
  end
  return nil
end

local firsts, groups, adjusted = {}, {}, {}
local pos = 5
for i = 1, tonumber(ARGV[4]) do
  firsts[i] = call('HSETNX', PREFIX .. ':period:{' .. ARGV[pos] .. '}:' .. ARGV[pos + 1], 'xe', 1)
  pos = pos + 2
end

local last = #ARGV
while pos <= last do
  local tag, user, periods = ARGV[pos], ARGV[pos + 1], tonumber(ARGV[pos + 2])
  pos = pos + 3
  local rkey = PREFIX .. ':resv:{' .. tag .. '}'
  local held = nil
  local rids, p = {}, pos
  for _ = 1, periods do
    local j = p + 6
    for _ = 1, tonumber(ARGV[p + 5]) do
      if ARGV[j + 1] ~= '0' then rids[#rids + 1] = ARGV[j] end
      j = j + 3
    end
    p = j
  end
  if #rids >= MULTI then held = take_all(rkey, rids) end
  for _ = 1, periods do
    local pn, idx, k = ARGV[pos], tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 5])
    local delta, actual_sum, applied = 0, 0, 0
    local j = pos + 6
    for _ = 1, k do
      local actual = tonumber(ARGV[j + 2])
      local d = consume(rkey, held, tag, pn, ARGV[j], tonumber(ARGV[j + 1]), actual)
      if d then
        delta, actual_sum, applied = delta + d, actual_sum + actual, applied + 1
      end
      j = j + 3
    end
    if applied == 0 then
      groups[#groups + 1] = 0
    else
      TAG = tag
      local pkey = PREFIX .. ':period:{' .. tag .. '}:' .. pn
      -- One read for the record and its closed flag (each call costs microseconds).
      local rec = call('HMGET', pkey, 'l', 'b', 'g', 'x')
      local l, b, gr = n(rec[1]), n(rec[2]), n(rec[3])
      if not rec[1] then
        l, b, gr = open_period(pkey, key('user'), idx, tonumber(ARGV[pos + 2]),
                               tonumber(ARGV[pos + 3]), tonumber(ARGV[pos + 4]))
      end
      -- int(): exact integer text, whatever the size.
      call('INCRBY', PREFIX .. ':budget:{' .. tag .. '}:' .. pn, int(delta))
      local used = call('HINCRBY', pkey, 'u', int(actual_sum))
      local eff = l + b + gr
      local closed = rec[4] == '1' and 1 or 0
      local flags = {}
      if eff > 0 and used > 0 then
        for _, pct in ipairs(percents) do
          if used * 100 >= pct * eff and call('HSETNX', pkey, 't' .. pct, 1) == 1 then
            flags[#flags + 1] = pct
          end
        end
      end
      if used > 0 and used >= eff and call('HSETNX', pkey, 'xe', 1) == 1 then
        flags[#flags + 1] = -1
      end
      -- Hashed tags cannot be decoded: keep the raw id for the events.
      if user ~= '' then call('HSETNX', key('user'), 'id', user) end
      local g = #groups
      groups[g + 1], groups[g + 2], groups[g + 3], groups[g + 4] = applied, used, eff, closed
      groups[g + 5] = #flags
      for f = 1, #flags do groups[g + 5 + f] = flags[f] end
      if closed == 1 then
        local next_idx, next_bonus = finalise_next(idx)
        table.insert(adjusted, summary(idx, next_idx, next_bonus))
      end
    end
    pos = j
  end
end
return {firsts, groups, adjusted}
