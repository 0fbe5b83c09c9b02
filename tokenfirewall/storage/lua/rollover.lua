-- Period close and rollover finalisation, shared by close.lua, expire.lua and
-- settle_many.lua (the worker composes them after common.lua). Needs `key`,
-- `n` and TAG from common.lua; TAG may be reassigned per user by the caller.

-- The first period after `idx` that has a record (within LOOKBACK months).
local function next_record(idx)
  for i = idx + 1, idx + LOOKBACK do
    if redis.call('EXISTS', key('period', i)) == 1 then return i end
  end
  return nil
end

-- Write the final bonus of the record after `idx` from idx's reconciled usage
-- (idle months between count with used = 0 and the next record's limit).
-- When that record is closed too and its bonus changed, its successor's bonus
-- depends on it: follow the chain. Returns the next period and its bonus; with
-- no next record yet, the carry-over projected under idx's own policy.
local function finalise_next(idx)
  local cur, first_next, first_bonus = idx, nil, nil
  while true do
    local rec = redis.call('HMGET', key('period', cur), 'l', 'b', 'g', 'u', 'r', 'c')
    local unused = math.max(0, n(rec[1]) + n(rec[2]) + n(rec[3]) - n(rec[4]))
    local nx = next_record(cur)
    if not nx then
      if first_next then return first_next, first_bonus end
      local projected = 0
      if rec[5] == '1' then projected = math.min(unused, n(rec[6])) end
      return idx + 1, projected
    end
    local nrec = redis.call('HMGET', key('period', nx), 'l', 'r', 'c', 'x', 'b')
    local bonus = 0
    if nrec[2] == '1' then
      bonus = math.max(0, math.min(unused + (nx - cur - 1) * n(nrec[1]), n(nrec[3])))
    end
    redis.call('HSET', key('period', nx), 'b', bonus, 'f', 1)
    if not first_next then first_next, first_bonus = nx, bonus end
    if nrec[4] ~= '1' or n(nrec[5]) == bonus then return first_next, first_bonus end
    cur = nx
  end
end

-- What the period.closed / period.adjusted events report about `idx`.
local function summary(idx, next_idx, next_bonus)
  local rec = redis.call('HMGET', key('period', idx), 'l', 'b', 'g', 'u')
  local id = redis.call('HGET', key('user'), 'id') or ''
  return {TAG, idx, n(rec[4]), n(rec[1]) + n(rec[2]) + n(rec[3]), next_idx, next_bonus, id}
end
