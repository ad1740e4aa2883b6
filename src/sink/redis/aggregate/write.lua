-- The aggregate views' write script; aggregate/mod.rs documents the layout and the semantics
-- (and state.rs renders them in Rust: the two must agree).
--
-- KEYS: the entities' hashes (one on a cluster, where a script's keys must share a slot).
-- ARGV: the view's head: bucket ms, lateness ms, longest window ms, ttl s, `_parts`, P, P part
-- kinds, want (`1`: return the hash as it was before the call); then for each key in turn: its
-- guard field, the `_v` to write (every write moves it, so that any snapshot of the hash
-- another writer holds is no longer current), N, N x (offset, event ms, P values).
-- Reply: one entry per key: `{outcomes, wm}`, outcomes one letter per event (`a` applied,
-- `r` a replay, `l` too late), wm the hash's `_wm` before the call (`''`: none); with want,
-- followed by the fields and values the hash held before the call (without its buckets when
-- the view's definition changed). Or `{'error', message}` when Redis refuses the key (a key
-- of another type).
--
-- Without want, a key costs one HMGET of its meta fields and of the buckets its events land
-- in, one HSET and one EXPIRE: the whole hash is read only when the view's definition
-- changed, or for a hash written before `_lo` existed. Trimming deletes the bucket fields from
-- `_lo` (no bucket starts before it) to the horizon. A call of replays only writes nothing.
local bucket, lateness, longest = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl, desc = tonumber(ARGV[4]), ARGV[5]
local np = tonumber(ARGV[6])
local kinds = {}
for j = 1, np do kinds[j] = ARGV[6 + j] end
local i = 7 + np
local want = ARGV[i] == '1'
i = i + 1
-- Fields handled in one command at most this many at a time (Lua's unpack limit).
local CHUNK = 4000
-- More buckets than this between `_lo` and the horizon (an entity quiet for long): the
-- hash's fields are listed instead of every bucket start in between.
local STEPS = 512

local function chunked(cmd, key, fields)
  for a = 1, #fields, CHUNK do
    redis.call(cmd, key, unpack(fields, a, math.min(a + CHUNK - 1, #fields)))
  end
end

local function empty()
  local b = {}
  for j = 1, np do
    if kinds[j] == 'lo' or kinds[j] == 'hi' then b[j] = false else b[j] = 0 end
  end
  return b
end

local function num(x)
  if x == false then return 'null' end
  return string.format('%.17g', x)
end

local function int(x)
  return string.format('%d', x)
end

local reply = {}
for k = 1, #KEYS do
  local key, guard, version = KEYS[k], ARGV[i], ARGV[i + 1]
  local ne = tonumber(ARGV[i + 2])
  local first = i + 3
  i = first + ne * (2 + np)
  -- The meta fields and the buckets the events land in, read at once.
  local fields, at = {guard, '_wm', '_parts', '_lo'}, {}
  for e = 0, ne - 1 do
    local ts = tonumber(ARGV[first + e * (2 + np) + 1])
    local start = ts - ts % bucket
    if not at[start] then
      fields[#fields + 1] = int(start)
      at[start] = #fields
    end
  end
  local got = redis.pcall('HMGET', key, unpack(fields))
  if got.err then
    reply[k] = {'error', got.err}
  else
    local last = tonumber(got[1]) or -1
    local wm0, parts, lo = got[2], got[3], tonumber(got[4])
    local wm = tonumber(wm0)
    local changed = parts and parts ~= desc
    local whole = changed or (wm and not lo) or want
    -- raw: the stored JSON of each bucket read, by start; stored: the whole hash, when read.
    local raw, stored = {}, nil
    if whole then
      stored = redis.call('HGETALL', key)
      for j = 1, #stored, 2 do
        local start = tonumber(stored[j])
        if start then raw[start] = stored[j + 1] end
      end
      if changed then
        -- The view's definition changed: its aggregates start again (the guards stay).
        local drop, meta = {}, {}
        for start in pairs(raw) do drop[#drop + 1] = int(start) end
        chunked('HDEL', key, drop)
        for j = 1, #stored, 2 do
          if not tonumber(stored[j]) then
            meta[#meta + 1] = stored[j]
            meta[#meta + 1] = stored[j + 1]
          end
        end
        raw, stored, lo = {}, meta, nil
      elseif not lo then
        -- A hash written before `_lo` existed: its first bucket.
        for start in pairs(raw) do
          if not lo or start < lo then lo = start end
        end
      end
    else
      for start, j in pairs(at) do
        if got[j] then raw[start] = got[j] end
      end
    end

    -- moved: an event was applied or judged too late (its guard moves); a call of replays
    -- only writes nothing, not even `_v` or the EXPIRE (a replay is no sign of life).
    local outcomes, buckets, dirty, moved = {}, {}, {}, changed
    for e = 1, ne do
      local off, ts = tonumber(ARGV[first]), tonumber(ARGV[first + 1])
      local values = first + 2
      first = values + np
      if off <= last then
        outcomes[e] = 'r'
      elseif wm and ts < wm - lateness then
        outcomes[e] = 'l'
        last = off
        moved = true
      else
        local start = ts - ts % bucket
        local b = buckets[start]
        if b == nil then
          if raw[start] then
            b = cjson.decode(raw[start])
            for j = 1, np do
              if b[j] == cjson.null or b[j] == nil then b[j] = false end
            end
          else
            b = empty()
          end
          buckets[start] = b
        end
        for j = 1, np do
          local kind, x = kinds[j], ARGV[values + j - 1]
          if kind == 'n' then
            b[j] = b[j] + 1
          elseif x ~= '' then
            x = tonumber(x)
            if kind == 's' then b[j] = b[j] + x
            elseif kind == 'c' or kind == 'k' then b[j] = b[j] + 1
            elseif kind == 'lo' then if not b[j] or x < b[j] then b[j] = x end
            elseif kind == 'hi' then if not b[j] or x > b[j] then b[j] = x end
            end
          end
        end
        dirty[start] = true
        if not lo or start < lo then lo = start end
        last = off
        if not wm or ts > wm then wm = ts end
        outcomes[e] = 'a'
        moved = true
      end
    end

    if wm and moved then
      -- Buckets at or before the horizon, bucket(wm - lateness) - longest, are deleted: no
      -- window of an event that is not too late reaches them.
      local edge = wm - lateness
      local horizon = edge - edge % bucket - longest
      local hset = {guard, int(last), '_wm', int(wm), '_parts', desc}
      local hdel = {}
      for start in pairs(dirty) do
        if start > horizon then
          local b, vals = buckets[start], {}
          for j = 1, np do vals[j] = num(b[j]) end
          hset[#hset + 1] = int(start)
          hset[#hset + 1] = '[' .. table.concat(vals, ',') .. ']'
        end
      end
      if lo and lo <= horizon then
        if whole or (horizon - lo) / bucket >= STEPS then
          local starts = raw
          if not whole then
            starts = {}
            for _, f in ipairs(redis.call('HKEYS', key)) do
              local start = tonumber(f)
              if start then starts[start] = true end
            end
          end
          for start in pairs(starts) do
            if start <= horizon then hdel[#hdel + 1] = int(start) end
          end
        else
          for start = lo, horizon, bucket do hdel[#hdel + 1] = int(start) end
        end
        lo = horizon + bucket
      end
      -- No bucket at all (a definition change with nothing applied since): none before the
      -- horizon either.
      lo = lo or horizon + bucket
      hset[#hset + 1] = '_lo'
      hset[#hset + 1] = int(lo)
      hset[#hset + 1] = '_v'
      hset[#hset + 1] = version
      chunked('HSET', key, hset)
      if #hdel > 0 then chunked('HDEL', key, hdel) end
      redis.call('EXPIRE', key, ttl)
    end
    local r = {table.concat(outcomes), wm0 or ''}
    if want then
      for j = 1, #stored do r[2 + j] = stored[j] end
    end
    reply[k] = r
  end
end
return reply
