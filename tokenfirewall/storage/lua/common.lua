-- Shared helpers, prepended to every script. Every script receives the key
-- prefix as ARGV[1] and the encoded user id (the hash tag) as ARGV[2]; keys it
-- builds itself share that tag, so they live in the caller's cluster slot.
local PREFIX, TAG = ARGV[1], ARGV[2]

local function int(n)
  -- Concatenation formats numbers with %.14g; budgets need exact integers.
  return string.format('%d', n)
end

local function pname(i)
  return string.format('%04d-%02d', math.floor(i / 12), i % 12 + 1)
end

local function key(kind, idx)
  local k = PREFIX .. ':' .. kind .. ':{' .. TAG .. '}'
  if idx then k = k .. ':' .. pname(idx) end
  return k
end

local function n(v)
  return tonumber(v or 0) or 0
end

-- Carry-over from period `last` into `idx`: closed form of the idle-month
-- chain (each idle month counts with used = 0 and the current limit).
local function carry(last, idx, limit, cap)
  local l = redis.call('HMGET', key('period', last), 'l', 'b', 'g', 'x')
  local unused, final = 0, 0
  if l[1] then
    -- Charged (usage plus open reservations) is never below final usage, so a
    -- provisional bonus never exceeds the final one.
    local charged = n(redis.call('GET', key('budget', last)))
    unused = math.max(0, n(l[1]) + n(l[2]) + n(l[3]) - charged)
    local used = n(redis.call('HGET', key('period', last), 'u'))
    if l[4] == '1' and used == charged then final = 1 end
  end
  return math.min(unused + (idx - last - 1) * limit, cap), final
end

-- Make sure the record of period `idx` exists, storing the policy in force;
-- returns monthly limit, bonus and granted top-ups.
local function open_period(pkey, ukey, idx, limit, rollover, cap)
  local rec = redis.call('HMGET', pkey, 'l', 'b', 'g')
  if rec[1] then return n(rec[1]), n(rec[2]), n(rec[3]) end
  local override = redis.call('HGET', ukey, 'o')
  if override then limit = n(override) end
  local last = tonumber(redis.call('HGET', ukey, 'p') or -1)
  local bonus, final = 0, 1
  if rollover == 1 and last >= 0 and last < idx then
    bonus, final = carry(last, idx, limit, cap)
  end
  redis.call('HSET', pkey, 'l', limit, 'r', rollover, 'c', cap, 'b', bonus, 'f', final, 'u', 0)
  if last < idx then redis.call('HSET', ukey, 'p', idx) end
  return limit, bonus, 0
end
