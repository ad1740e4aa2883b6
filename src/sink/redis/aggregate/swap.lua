-- The aggregate views' compare-and-set script; aggregate/mod.rs documents when it is used.
--
-- KEYS: the entities' hashes (one on a cluster, where a script's keys must share a slot).
-- ARGV: for each key in turn: the `_v` of the caller's snapshot of the hash, the key's TTL in
-- seconds, S, S x (field, value) to set, D, D x field to delete.
-- Reply: one entry per key: 1 when the hash's `_v` was the snapshot's (the fields set and
-- deleted, and the EXPIRE refreshed, at once), 0 when it was not (nothing written: another
-- write came between, or the hash expired), or `{'error', message}` when Redis refuses the
-- key (a key of another type).
local CHUNK = 4000
local i = 1
local reply = {}
for k = 1, #KEYS do
  local key, seen, ttl = KEYS[k], ARGV[i], ARGV[i + 1]
  local ns = tonumber(ARGV[i + 2])
  local set = i + 3
  local nd = tonumber(ARGV[set + 2 * ns])
  local del = set + 2 * ns + 1
  i = del + nd
  local v = redis.pcall('HGET', key, '_v')
  if type(v) == 'table' and v.err then
    reply[k] = {'error', v.err}
  elseif v ~= seen then
    reply[k] = 0
  else
    for a = set, set + 2 * ns - 1, CHUNK do
      redis.call('HSET', key, unpack(ARGV, a, math.min(a + CHUNK - 1, set + 2 * ns - 1)))
    end
    for a = del, del + nd - 1, CHUNK do
      redis.call('HDEL', key, unpack(ARGV, a, math.min(a + CHUNK - 1, del + nd - 1)))
    end
    redis.call('EXPIRE', key, ttl)
    reply[k] = 1
  end
end
return reply
