//! Aggregate views: windowed per-entity aggregates, exactly once under at-least-once delivery,
//! and read back at each event's point in time for the models.
//!
//! **Layout** (one hash per entity and view, so one script call is atomic and Cluster-safe):
//!
//! | field | value |
//! |---|---|
//! | `<bucket start, ms since the epoch>` | the bucket's partials as a JSON array in `_parts` order (`null` for a `lo`/`hi` with no value) |
//! | `_parts` | `<bucket ms>;<part>,<part>,…`, parts `n` (events), `c:<feature>` (events matching its condition), `s:<col>` (sum), `k:<col>` (non-null values), `lo:<col>`, `hi:<col>` |
//! | `_wm` | the entity's newest applied event time (ms) |
//! | `_o:<topic>:<partition>` | the guard: the last offset of that partition applied (or judged too late) |
//!
//! **Write** ([`WRITE`]): one call per (entity, source partition) per batch, carrying that
//! partition's events of the entity as `(offset, event ms, partial inputs)` in offset order.
//! An event at or below the guard is a replay and changes nothing; an event more than the
//! lateness behind `_wm` is too late (counted, not applied); any other lands in the bucket
//! `ts - ts % bucket`. The guard, `_wm` and the buckets change in the same script, so a replay
//! after a crash, a duplicate delivery or a group reset never counts an event twice. Buckets
//! at or before `bucket(_wm - lateness) - longest window` are deleted in the same script, and
//! the key's EXPIRE is refreshed (`ttl`): an entity quiet for that long disappears with its
//! guards.
//!
//! **Windows.** A window of length W ending at time t covers the buckets whose start is in
//! `(bucket(t) - W, bucket(t)]`: the trailing edge moves one bucket at a time (the window
//! holds between W - bucket and W of history, plus the current bucket's events after t).
//!
//! **Point in time** (enrichment): each event gets the windows ending at its own event time,
//! over what the hash holds once the event is applied: the event itself included, and the
//! events of earlier offsets. An event that is too late gets nulls. A replay finds what was
//! applied before the crash: later offsets of the same partition already in buckets at or
//! before the event's own.

use std::collections::HashMap;

use arrow::{
    array::{ArrayRef, Float64Array},
    record_batch::RecordBatch,
};
use redis::Value;

use crate::{
    config::{AggregateSpec, Function, KeyPart, Part},
    util::text::{encode, render_key},
};

/// The write script; see the module documentation. `ARGV`: bucket ms, lateness ms, longest
/// window ms, ttl s, guard field, `_parts`, P, P part kinds, want (`1`: return each event's
/// windows), W, W window lengths ms, N, then N × (offset, event ms, P values). Returns
/// `{applied, replayed, late}` and, with want, N × W × P partials (`''`: none; all `''` for
/// a too-late event).
pub(super) const WRITE: &str = r#"
local key = KEYS[1]
local bucket, lateness, longest = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl, guard, desc = tonumber(ARGV[4]), ARGV[5], ARGV[6]
local np = tonumber(ARGV[7])
local kinds = {}
for j = 1, np do kinds[j] = ARGV[7 + j] end
local i = 8 + np
local want = ARGV[i] == '1'
local nw = tonumber(ARGV[i + 1])
i = i + 2
local wins = {}
for j = 1, nw do wins[j] = tonumber(ARGV[i]); i = i + 1 end
local ne = tonumber(ARGV[i]); i = i + 1

-- Buckets are decoded only when an event needs them: `raw` holds the stored JSON, `buckets`
-- the decoded partials (and the new buckets).
local stored = redis.call('HGETALL', key)
local raw, buckets, meta = {}, {}, {}
for j = 1, #stored, 2 do
  local start = tonumber(stored[j])
  if start then raw[start] = stored[j + 1] else meta[stored[j]] = stored[j + 1] end
end
if meta['_parts'] and meta['_parts'] ~= desc then
  -- The view's definition changed: its aggregates start again (the guards stay).
  for start in pairs(raw) do redis.call('HDEL', key, string.format('%d', start)) end
  raw = {}
end
local function bucket_of(start)
  local b = buckets[start]
  if b == nil and raw[start] then
    b = cjson.decode(raw[start])
    for j = 1, np do
      if b[j] == cjson.null or b[j] == nil then b[j] = false end
    end
    buckets[start] = b
  end
  return b
end
local last = tonumber(meta[guard]) or -1
local wm = tonumber(meta['_wm'])
local dirty = {}
local applied, replayed, late = 0, 0, 0
local out = {}

local function merge(acc, b)
  for j = 1, np do
    local k, x = kinds[j], b[j]
    if k == 'lo' then
      if x and (not acc[j] or x < acc[j]) then acc[j] = x end
    elseif k == 'hi' then
      if x and (not acc[j] or x > acc[j]) then acc[j] = x end
    else
      acc[j] = acc[j] + x
    end
  end
end

local function empty()
  local b = {}
  for j = 1, np do
    if kinds[j] == 'lo' or kinds[j] == 'hi' then b[j] = false else b[j] = 0 end
  end
  return b
end

local function fmt(x)
  if x == false then return '' end
  return string.format('%.17g', x)
end

local function json(x)
  if x == false then return 'null' end
  return string.format('%.17g', x)
end

for _ = 1, ne do
  local off, ts = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local first = i + 2
  i = first + np
  if off <= last then
    replayed = replayed + 1
  elseif wm and ts < wm - lateness then
    late = late + 1
    last = off
  else
    local start = ts - ts % bucket
    local b = bucket_of(start)
    if not b then b = empty(); buckets[start] = b; raw[start] = '' end
    for j = 1, np do
      local k, v = kinds[j], ARGV[first + j - 1]
      if k == 'n' then
        b[j] = b[j] + 1
      elseif v ~= '' then
        local x = tonumber(v)
        if k == 's' then b[j] = b[j] + x
        elseif k == 'c' or k == 'k' then b[j] = b[j] + 1
        elseif k == 'lo' then if not b[j] or x < b[j] then b[j] = x end
        elseif k == 'hi' then if not b[j] or x > b[j] then b[j] = x end
        end
      end
    end
    dirty[start] = true
    last = off
    if not wm or ts > wm then wm = ts end
    applied = applied + 1
  end
  if want then
    if wm and ts < wm - lateness then
      for _ = 1, nw * np do out[#out + 1] = '' end
    else
      local cur = ts - ts % bucket
      local accs = {}
      for w = 1, nw do accs[w] = empty() end
      for start in pairs(raw) do
        if start <= cur and start > cur - longest then
          local b = bucket_of(start)
          for w = 1, nw do
            if start > cur - wins[w] then merge(accs[w], b) end
          end
        end
      end
      for w = 1, nw do
        for j = 1, np do out[#out + 1] = fmt(accs[w][j]) end
      end
    end
  end
end

if wm then
  local edge = wm - lateness
  local horizon = edge - edge % bucket - longest
  local hset = {guard, string.format('%d', last), '_wm', string.format('%d', wm), '_parts', desc}
  local hdel = {}
  for start in pairs(raw) do
    if start <= horizon then
      hdel[#hdel + 1] = string.format('%d', start)
    elseif dirty[start] then
      local b, vals = buckets[start], {}
      for j = 1, np do vals[j] = json(b[j]) end
      hset[#hset + 1] = string.format('%d', start)
      hset[#hset + 1] = '[' .. table.concat(vals, ',') .. ']'
    end
  end
  redis.call('HSET', key, unpack(hset))
  if #hdel > 0 then redis.call('HDEL', key, unpack(hdel)) end
  redis.call('EXPIRE', key, ttl)
end
local reply = {applied, replayed, late}
for j = 1, #out do reply[3 + j] = out[j] end
return reply
"#;

/// The read path, for any client (`EVAL_RO` on a replica works): `KEYS[1]` an aggregate
/// hash, `ARGV` the time to read at (ms) and window lengths (ms). Returns `{_parts, _wm}`,
/// then per window `{window ms, first bucket start, end (exclusive), partials…}` over the
/// buckets whose start is in `(bucket(t) - W, bucket(t)]`; `{}` when the key is absent.
pub const READ: &str = r#"
local stored = redis.call('HGETALL', KEYS[1])
if #stored == 0 then return {} end
local meta, buckets = {}, {}
for j = 1, #stored, 2 do
  local start = tonumber(stored[j])
  if start then buckets[start] = stored[j + 1] else meta[stored[j]] = stored[j + 1] end
end
local desc = meta['_parts'] or ''
local bucket = tonumber(desc:match('^(%d+);'))
local kinds = {}
for part in (desc:gsub('^%d+;', '') .. ','):gmatch('([^,]*),') do
  kinds[#kinds + 1] = part:match('^(%a+)')
end
local np = #kinds
local t = tonumber(ARGV[1])
local cur = t - t % bucket
local reply = {desc, meta['_wm'] or ''}
for w = 2, #ARGV do
  local len = tonumber(ARGV[w])
  local acc = {}
  for j = 1, np do
    if kinds[j] == 'lo' or kinds[j] == 'hi' then acc[j] = false else acc[j] = 0 end
  end
  for start, packed in pairs(buckets) do
    if start <= cur and start > cur - len then
      local vals = cjson.decode(packed)
      for j = 1, np do
        local x, k = vals[j], kinds[j]
        if type(x) == 'number' then
          if k == 'lo' then
            if not acc[j] or x < acc[j] then acc[j] = x end
          elseif k == 'hi' then
            if not acc[j] or x > acc[j] then acc[j] = x end
          else
            acc[j] = acc[j] + x
          end
        end
      end
    end
  end
  local row = {string.format('%d', len), string.format('%d', cur - len + bucket),
               string.format('%d', cur + bucket)}
  for j = 1, np do
    row[#row + 1] = acc[j] and string.format('%.17g', acc[j]) or ''
  end
  reply[#reply + 1] = row
end
return reply
"#;

/// One aggregate view, resolved for writing.
pub(super) struct View {
    pub(super) spec: AggregateSpec,
    parts: Vec<Part>,
    /// What each part takes from a row, in `parts` order.
    inputs: Vec<Input>,
    /// Whether a model takes its features: then each event's windows come back.
    enrich: bool,
    /// The arguments every call of this view starts with, after the guard.
    head: Vec<String>,
}

/// What the script gets from a row for one part.
enum Input {
    /// Nothing (`n` counts the event itself).
    None,
    /// `1` when the column's text form equals the value, else nothing.
    Equals { column: String, value: String },
    /// The column's value (nothing when null).
    Value(String),
}

impl View {
    pub(super) fn new(spec: &AggregateSpec, enrich: bool) -> Self {
        let parts = spec.parts();
        let inputs = parts
            .iter()
            .map(|part| match part {
                Part::Count => Input::None,
                Part::Matching(feature) => match spec
                    .features
                    .iter()
                    .find(|f| f.name == *feature)
                    .map(|f| &f.function)
                {
                    Some(Function::CountIf { column, equals }) => Input::Equals {
                        column: column.clone(),
                        value: equals.clone(),
                    },
                    _ => unreachable!("a matching part comes from a condition"),
                },
                Part::Sum(c) | Part::NonNull(c) | Part::Min(c) | Part::Max(c) => {
                    Input::Value(c.clone())
                }
            })
            .collect();
        let ms = |d: std::time::Duration| d.as_millis().to_string();
        let mut head = vec![spec.description(), parts.len().to_string()];
        head.extend(parts.iter().map(|p| p.kind().to_owned()));
        head.push(if enrich { "1" } else { "0" }.into());
        head.push(spec.windows.len().to_string());
        head.extend(spec.windows.iter().map(|(_, d)| ms(*d)));
        Self {
            spec: spec.clone(),
            parts,
            inputs,
            enrich,
            head,
        }
    }

    /// The script's input of one part for `row`: the column's value, `1` when the row
    /// matches a condition, `''` for none.
    fn input(input: &Input, batch: &RecordBatch, row: usize) -> String {
        let column = |c: &str| batch.column_by_name(c).expect("validated column");
        match input {
            Input::None => String::new(),
            Input::Equals { column: c, value } => {
                if encode(column(c), row).as_deref() == Some(value.as_str()) {
                    "1".into()
                } else {
                    String::new()
                }
            }
            Input::Value(c) => encode(column(c), row).unwrap_or_default(),
        }
    }
}

/// One script call: a view's events of one entity from one partition, in offset order.
pub(super) struct Call {
    pub(super) key: String,
    pub(super) args: Vec<String>,
    pub(super) view: usize,
    /// The batch rows of the events, in the order sent.
    pub(super) rows: Vec<usize>,
}

/// The calls for a batch: one per (view, entity, topic, partition). `times` are event times
/// in µs; rows with `skip` set are left out.
pub(super) fn calls(
    views: &[View],
    batch: &RecordBatch,
    times: &[i64],
    skip: &[bool],
) -> Vec<Call> {
    let (topics, partitions, offsets) = crate::schema::provenance(batch);
    let mut out = Vec::new();
    for (v, view) in views.iter().enumerate() {
        let mut groups: HashMap<(String, &str, i32), Vec<usize>> = HashMap::new();
        for row in (0..batch.num_rows()).filter(|r| !skip[*r]) {
            let key = render_key(&view.spec.key, batch, row);
            groups
                .entry((key, topics.value(row), partitions.value(row)))
                .or_default()
                .push(row);
        }
        for ((key, topic, partition), mut rows) in groups {
            rows.sort_by_key(|r| offsets.value(*r));
            let spec = &view.spec;
            let mut args = vec![
                spec.bucket.as_millis().to_string(),
                spec.lateness.as_millis().to_string(),
                spec.longest().as_millis().to_string(),
                spec.ttl.as_secs().max(1).to_string(),
                format!("_o:{topic}:{partition}"),
            ];
            args.extend(view.head.iter().cloned());
            args.push(rows.len().to_string());
            for &row in &rows {
                args.push(offsets.value(row).to_string());
                args.push(times[row].div_euclid(1_000).to_string());
                for input in &view.inputs {
                    args.push(View::input(input, batch, row));
                }
            }
            out.push(Call {
                key,
                args,
                view: v,
                rows,
            });
        }
    }
    out
}

/// A call and its events' partials.
pub(super) type Answered<'a> = (&'a Call, Vec<Option<f64>>);

/// What one call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) applied: u64,
    pub(super) replayed: u64,
    pub(super) late: u64,
}

/// Reads a call's reply: its counts, and (when the view enriches) each event's partials per
/// window and part.
pub(super) fn reply(value: Value) -> Result<(Counts, Vec<Option<f64>>), String> {
    let Value::Array(items) = value else {
        return Err(format!("expected an array, got {value:?}"));
    };
    let number = |v: &Value| -> Option<f64> {
        match v {
            Value::Int(n) => Some(*n as f64),
            Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            Value::SimpleString(s) => s.parse().ok(),
            _ => None,
        }
    };
    if items.len() < 3 {
        return Err(format!("expected counts, got {items:?}"));
    }
    let count = |i: usize| number(&items[i]).map(|n| n as u64).unwrap_or(0);
    let counts = Counts {
        applied: count(0),
        replayed: count(1),
        late: count(2),
    };
    Ok((counts, items[3..].iter().map(number).collect()))
}

/// Finishes a feature from a window's partials (`parts` order).
pub fn finish(
    spec: &AggregateSpec,
    parts: &[Part],
    partials: &[Option<f64>],
    f: usize,
) -> Option<f64> {
    let of = |p: Part| parts.iter().position(|q| *q == p).and_then(|i| partials[i]);
    let feature = &spec.features[f];
    match &feature.function {
        Function::Count => of(Part::Count),
        Function::CountIf { .. } => of(Part::Matching(feature.name.clone())),
        Function::Sum(c) => of(Part::Sum(c.clone())),
        Function::Avg(c) => match (of(Part::Sum(c.clone())), of(Part::NonNull(c.clone()))) {
            (Some(s), Some(k)) if k > 0.0 => Some(s / k),
            _ => None,
        },
        Function::Min(c) => of(Part::Min(c.clone())),
        Function::Max(c) => of(Part::Max(c.clone())),
    }
}

/// The enrichment columns of one view (`<view>.<feature>_<window>`, feature-major), from
/// each call's partials.
pub(super) fn columns(
    view: &View,
    rows: usize,
    results: &[Answered<'_>],
) -> Vec<(String, ArrayRef)> {
    let spec = &view.spec;
    let (nw, np) = (spec.windows.len(), view.parts.len());
    let mut values: Vec<Vec<Option<f64>>> = vec![vec![None; rows]; spec.features.len() * nw];
    for (call, partials) in results {
        for (e, &row) in call.rows.iter().enumerate() {
            for w in 0..nw {
                let at = (e * nw + w) * np;
                let Some(window) = partials.get(at..at + np) else {
                    continue;
                };
                for f in 0..spec.features.len() {
                    values[f * nw + w][row] = finish(spec, &view.parts, window, f);
                }
            }
        }
    }
    spec.feature_names()
        .into_iter()
        .zip(values)
        .map(|(name, v)| {
            (
                format!("{}.{name}", spec.name),
                std::sync::Arc::new(Float64Array::from(v)) as ArrayRef,
            )
        })
        .collect()
}

impl View {
    pub(super) fn enriches(&self) -> bool {
        self.enrich
    }
}

/// Whether `key` is one that the key template renders (its text parts in place, each column
/// part non-empty): how `sluice features get` tells an aggregate view's key.
pub fn key_matches(template: &[KeyPart], key: &str) -> bool {
    let mut rest = key;
    let mut parts = template.iter().peekable();
    while let Some(part) = parts.next() {
        match part {
            KeyPart::Text(t) => match rest.strip_prefix(t.as_str()) {
                Some(r) => rest = r,
                None => return false,
            },
            KeyPart::Column(_) => match parts.peek() {
                Some(KeyPart::Text(next)) => match rest.find(next.as_str()) {
                    Some(at) if at > 0 => rest = &rest[at..],
                    _ => return false,
                },
                _ => rest = "",
            },
        }
    }
    rest.is_empty()
}
