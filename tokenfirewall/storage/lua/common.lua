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

-- How far back (and forward) a user's records are looked for. A user with no
-- record in that window starts afresh: no bonus, as in a first month. Records
-- live for the worker's retention (400 days by default), and the cap bounds
-- any carry-over long before two idle years.
local LOOKBACK = 24

-- The latest period before `idx` with a record, or -1. Probing a few keys at
-- the first request of a month costs less than a per-user pointer key would
-- cost in memory for every user, all the time.
local function previous_record(idx)
  for i = idx - 1, idx - LOOKBACK, -1 do
    if redis.call('EXISTS', key('period', i)) == 1 then return i end
  end
  return -1
end

-- Make sure the record of period `idx` exists, storing the policy in force;
-- returns monthly limit, bonus and granted top-ups. `ukey` is the user hash,
-- which exists only for users with a limit override (`o`) or a hashed id.
local function open_period(pkey, ukey, idx, limit, rollover, cap)
  local rec = redis.call('HMGET', pkey, 'l', 'b', 'g')
  if rec[1] then return n(rec[1]), n(rec[2]), n(rec[3]) end
  local override = redis.call('HGET', ukey, 'o')
  if override then limit = n(override) end
  local bonus, final = 0, 1
  if rollover == 1 then
    local last = previous_record(idx)
    if last >= 0 then bonus, final = carry(last, idx, limit, cap) end
  end
  redis.call('HSET', pkey, 'l', limit, 'r', rollover, 'c', cap, 'b', bonus, 'f', final, 'u', 0)
  return limit, bonus, 0
end
