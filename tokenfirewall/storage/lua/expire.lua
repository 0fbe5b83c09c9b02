-- Release a user's reservations whose settlement never came: move each expired
-- entry of the `resv` hash to the `rel` hash (so a late settlement still
-- applies once, as its full actual usage) and give its tokens back to the
-- period it was charged to. Released markers older than the retention are
-- forgotten. A release from a closed period changes nothing final (the final
-- bonus comes from reconciled usage) but a provisional next bonus computed
-- from the charged tokens becomes final: finalise it again.
-- KEYS: reservations, released (of one user)
-- ARGV: prefix, tag, now ms, forget released markers that expired before (ms, 0: never)
local now, forget = tonumber(ARGV[3]), tonumber(ARGV[4])
local count, tokens, closed = 0, 0, {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local idx, amount, expiry = string.match(flat[i + 1], '^(%d+):(%d+):(%d+)$')
  if idx and tonumber(expiry) <= now then
    redis.call('HDEL', KEYS[1], flat[i])
    redis.call('HSET', KEYS[2], flat[i], flat[i + 1])
    redis.call('DECRBY', key('budget', tonumber(idx)), amount)
    count, tokens = count + 1, tokens + tonumber(amount)
    closed[idx] = true
  end
end
if forget > 0 then
  local released = redis.call('HGETALL', KEYS[2])
  for i = 1, #released, 2 do
    local expiry = string.match(released[i + 1], ':(%d+)$')
    if expiry and tonumber(expiry) < forget then redis.call('HDEL', KEYS[2], released[i]) end
  end
end
local adjusted = {}
for idx in pairs(closed) do
  local i = tonumber(idx)
  if redis.call('HGET', key('period', i), 'x') == '1' then
    local next_idx, next_bonus = finalise_next(i)
    table.insert(adjusted, summary(i, next_idx, next_bonus))
  end
end
return {count, int(tokens), adjusted}
