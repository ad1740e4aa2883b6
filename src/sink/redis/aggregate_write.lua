-- The aggregate views' write script; aggregate.rs documents the layout and the semantics.
--
-- KEYS: the entities' hashes (one on a cluster, where a script's keys must share a slot).
-- ARGV: the view's head: bucket ms, lateness ms, longest window ms, ttl s, `_parts`, P, P part
-- kinds, want (`1`: also return the buckets as they were before the call); then for each key
-- in turn: its guard field, N, N x (offset, event ms, P values).
-- Reply: one entry per key: `{outcomes, wm}`, outcomes one letter per event (`a` applied,
-- `r` a replay, `l` too late), wm the hash's `_wm` before the call (`''`: none); with want,
-- followed by the fields and values the hash held before the call (no buckets when the
-- view's definition changed; the fields that are not numbers are not buckets). Or `{'error', message}` when Redis refuses the key (a key of
-- another type).
--
-- The events' windows are summed by the caller from those buckets and the events: decoding
-- every bucket here, for every event, was most of the server's time.
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

local reply = {}
for k = 1, #KEYS do
  local key, guard = KEYS[k], ARGV[i]
  local ne = tonumber(ARGV[i + 1])
  i = i + 2
  local stored = redis.pcall('HGETALL', key)
  if stored.err then
    reply[k] = {'error', stored.err}
    i = i + ne * (2 + np)
  else
    -- raw: the stored JSON of each bucket; buckets: those decoded (and the new ones).
    local raw, buckets, meta = {}, {}, {}
    for j = 1, #stored, 2 do
      local start = tonumber(stored[j])
      if start then raw[start] = stored[j + 1] else meta[stored[j]] = stored[j + 1] end
    end
    if meta['_parts'] and meta['_parts'] ~= desc then
      -- The view's definition changed: its aggregates start again (the guards stay).
      local drop = {}
      for start in pairs(raw) do drop[#drop + 1] = string.format('%d', start) end
      chunked('HDEL', key, drop)
      raw, stored = {}, {}
    end
    local last = tonumber(meta[guard]) or -1
    local wm = tonumber(meta['_wm'])
    local outcomes = {}
    local dirty = {}
    for e = 1, ne do
      local off, ts = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
      local first = i + 2
      i = first + np
      if off <= last then
        outcomes[e] = 'r'
      elseif wm and ts < wm - lateness then
        outcomes[e] = 'l'
        last = off
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
          raw[start] = true
        end
        for j = 1, np do
          local kind, v = kinds[j], ARGV[first + j - 1]
          if kind == 'n' then
            b[j] = b[j] + 1
          elseif v ~= '' then
            local x = tonumber(v)
            if kind == 's' then b[j] = b[j] + x
            elseif kind == 'c' or kind == 'k' then b[j] = b[j] + 1
            elseif kind == 'lo' then if not b[j] or x < b[j] then b[j] = x end
            elseif kind == 'hi' then if not b[j] or x > b[j] then b[j] = x end
            end
          end
        end
        dirty[start] = true
        last = off
        if not wm or ts > wm then wm = ts end
        outcomes[e] = 'a'
      end
    end

    if wm then
      -- Buckets at or before the horizon, bucket(wm - lateness) - longest, are deleted.
      local edge = wm - lateness
      local horizon = edge - edge % bucket - longest
      local hset = {guard, string.format('%d', last), '_wm', string.format('%d', wm), '_parts', desc}
      local hdel = {}
      for start in pairs(raw) do
        if start <= horizon then
          hdel[#hdel + 1] = string.format('%d', start)
        elseif dirty[start] then
          local b, vals = buckets[start], {}
          for j = 1, np do vals[j] = num(b[j]) end
          hset[#hset + 1] = string.format('%d', start)
          hset[#hset + 1] = '[' .. table.concat(vals, ',') .. ']'
        end
      end
      chunked('HSET', key, hset)
      if #hdel > 0 then chunked('HDEL', key, hdel) end
      redis.call('EXPIRE', key, ttl)
    end
    local r = {table.concat(outcomes), meta['_wm'] or ''}
    if want then
      for j = 1, #stored do r[2 + j] = stored[j] end
    end
    reply[k] = r
  end
end
return reply
