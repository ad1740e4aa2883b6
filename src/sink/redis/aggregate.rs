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
//! **Write** ([`WRITE`]): one call carries up to [`KEYS_PER_CALL`] entries of one view, an
//! entry being one entity's events of one source partition as `(offset, event ms, partial
//! inputs)` in offset order. An event at or below the entry's guard is a replay and changes
//! nothing; an event more than the lateness behind `_wm` is too late (counted, not applied);
//! any other lands in the bucket `ts - ts % bucket`. The guard, `_wm` and the buckets change
//! in the same script, so a replay after a crash, a duplicate delivery or a group reset never
//! counts an event twice. Buckets at or before `bucket(_wm - lateness) - longest window` are
//! deleted in the same script, and the key's EXPIRE is refreshed (`ttl`): an entity quiet for
//! that long disappears with its guards. On a cluster each call has one entry (a script's keys
//! must share a slot).
//!
//! For a view a model reads, the script also returns each event's outcome and the buckets as
//! they were before the call (what its HGETALL read), and sluice sums each event's windows
//! from them ([`windows`]), applying the entry's events in order as the script did: walking
//! every bucket in Lua for every event had been most of the server's time.
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

/// The write script (`aggregate_write.lua`, which documents its arguments and reply): one
/// call carries the events of up to [`KEYS_PER_CALL`] entities of one view.
pub(super) const WRITE: &str = include_str!("aggregate_write.lua");

/// Entities per write call on a standalone server (on a cluster one, as a script's keys must
/// share a slot): the script's fixed cost is paid once for them all, and the call stays short
/// enough not to hold the server up (a few hundred microseconds).
pub(super) const KEYS_PER_CALL: usize = 64;

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
    /// The arguments every call of this view starts with.
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
        let mut head = vec![
            spec.bucket.as_millis().to_string(),
            spec.lateness.as_millis().to_string(),
            spec.longest().as_millis().to_string(),
            spec.ttl.as_secs().max(1).to_string(),
            spec.description(),
            parts.len().to_string(),
        ];
        head.extend(parts.iter().map(|p| p.kind().to_owned()));
        head.push(if enrich { "1" } else { "0" }.into());
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

/// One script call: a view's events of up to `per_call` entities, each entity's events of one
/// source partition in offset order (an entity seen on two partitions is two entries, each
/// with its guard).
pub(super) struct Call {
    pub(super) view: usize,
    pub(super) keys: Vec<String>,
    pub(super) args: Vec<String>,
    /// Where the view's head ends in `args`, and each entry's arguments.
    head: usize,
    tails: Vec<std::ops::Range<usize>>,
    /// Each entry's batch rows, in the order sent.
    pub(super) rows: Vec<Vec<usize>>,
    /// With a view that enriches, each entry's events as sent: event ms and the script's
    /// input of each part (as a number; `None` for `''`).
    events: Vec<Vec<(i64, Vec<Option<f64>>)>>,
}

impl Call {
    /// Entry `e`'s events as sent (none unless the view enriches).
    pub(super) fn event(&self, e: usize) -> &[(i64, Vec<Option<f64>>)] {
        self.events.get(e).map_or(&[], Vec::as_slice)
    }

    /// The call again as one call per entry: after Redis refused the whole call, each entity
    /// on its own, so that only the one it cannot take is refused.
    pub(super) fn split(&self) -> Vec<Call> {
        (0..self.keys.len())
            .map(|e| {
                let mut args = self.args[..self.head].to_vec();
                args.extend_from_slice(&self.args[self.tails[e].clone()]);
                Call {
                    view: self.view,
                    keys: vec![self.keys[e].clone()],
                    tails: std::iter::once(self.head..args.len()).collect(),
                    args,
                    head: self.head,
                    rows: vec![self.rows[e].clone()],
                    events: self.events.get(e).cloned().into_iter().collect(),
                }
            })
            .collect()
    }
}

/// A call planned: a view's entries (entity key, guard field, batch rows in offset order).
pub(super) struct Plan {
    view: usize,
    entries: Vec<(String, String, Vec<usize>)>,
}

/// The calls of view `v` for a batch, planned: its events grouped by (entity, topic,
/// partition), up to `per_call` groups per call. Rows with `skip` set are left out. The
/// arguments are made by [`Plan::call`], so that a call's can be made while Redis runs the
/// previous.
pub(super) fn plan(
    v: usize,
    view: &View,
    batch: &RecordBatch,
    skip: &[bool],
    per_call: usize,
) -> Vec<Plan> {
    let (topics, partitions, offsets) = crate::schema::provenance(batch);
    let mut out = Vec::new();
    {
        let mut order = Vec::new();
        let mut groups: HashMap<(String, &str, i32), Vec<usize>> = HashMap::new();
        for row in (0..batch.num_rows()).filter(|r| !skip[*r]) {
            let key = render_key(&view.spec.key, batch, row);
            groups
                .entry((key, topics.value(row), partitions.value(row)))
                .or_insert_with_key(|k| {
                    order.push(k.clone());
                    Vec::new()
                })
                .push(row);
        }
        for chunk in order.chunks(per_call.max(1)) {
            let entries = chunk
                .iter()
                .map(|group| {
                    let mut rows = groups.remove(group).expect("grouped above");
                    rows.sort_by_key(|r| offsets.value(*r));
                    let (key, topic, partition) = group;
                    (key.clone(), format!("_o:{topic}:{partition}"), rows)
                })
                .collect();
            out.push(Plan { view: v, entries });
        }
    }
    out
}

impl Plan {
    /// The call's arguments, from the batch's rows (`times`: event times in µs).
    pub(super) fn call(self, views: &[View], batch: &RecordBatch, times: &[i64]) -> Call {
        let offsets = crate::schema::provenance(batch).2;
        let view = &views[self.view];
        let mut args = view.head.clone();
        let n = self.entries.len();
        let mut call = Call {
            view: self.view,
            keys: Vec::with_capacity(n),
            head: args.len(),
            args: Vec::new(),
            tails: Vec::with_capacity(n),
            rows: Vec::with_capacity(n),
            events: Vec::new(),
        };
        for (key, guard, rows) in self.entries {
            let from = args.len();
            args.push(guard);
            args.push(rows.len().to_string());
            let mut events = Vec::new();
            for &row in &rows {
                let ms = times[row].div_euclid(1_000);
                args.push(offsets.value(row).to_string());
                args.push(ms.to_string());
                let at = args.len();
                for input in &view.inputs {
                    args.push(View::input(input, batch, row));
                }
                if view.enrich {
                    // A condition's or a count's input is only present or not.
                    let inputs = args[at..]
                        .iter()
                        .map(|v| (!v.is_empty()).then(|| v.parse().unwrap_or(1.0)))
                        .collect();
                    events.push((ms, inputs));
                }
            }
            if view.enrich {
                call.events.push(events);
            }
            call.tails.push(from..args.len());
            call.keys.push(key);
            call.rows.push(rows);
        }
        call.args = args;
        call
    }
}

/// An entry's rows and their events' partials.
pub(super) type Answered = (Vec<usize>, Vec<Option<f64>>);

/// What one call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) applied: u64,
    pub(super) replayed: u64,
    pub(super) late: u64,
}

/// What the script did with one entry.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Answer {
    /// Per event: `a` applied, `r` a replay, `l` too late.
    outcomes: Vec<u8>,
    /// The hash's `_wm` before the call.
    wm: Option<i64>,
    /// With a view that enriches, the buckets before the call, by start.
    buckets: std::collections::BTreeMap<i64, Vec<Option<f64>>>,
}

impl Answer {
    pub(super) fn counts(&self) -> Counts {
        let n = |c: u8| self.outcomes.iter().filter(|o| **o == c).count() as u64;
        Counts {
            applied: n(b'a'),
            replayed: n(b'r'),
            late: n(b'l'),
        }
    }
}

/// One entry's answer, or why Redis refused its key.
pub(super) type Outcome = Result<Answer, String>;

/// Reads a call's reply: one outcome per entry, in the call's order.
pub(super) fn reply(value: Value, entries: usize) -> Result<Vec<Outcome>, String> {
    let Value::Array(items) = value else {
        return Err(format!("expected an array, got {value:?}"));
    };
    if items.len() != entries {
        return Err(format!("expected {entries} entries, got {}", items.len()));
    }
    items
        .into_iter()
        .map(|item| {
            let Value::Array(fields) = item else {
                return Err(format!("expected an entry, got {item:?}"));
            };
            if fields.len() < 2 {
                return Err(format!("expected outcomes, got {fields:?}"));
            }
            let first = text(&fields[0]).unwrap_or_default();
            if first == "error" {
                return Ok(Err(text(&fields[1]).unwrap_or_default().to_owned()));
            }
            let mut answer = Answer {
                outcomes: first.as_bytes().to_vec(),
                wm: text(&fields[1]).and_then(|w| w.parse().ok()),
                buckets: Default::default(),
            };
            for pair in fields[2..].chunks(2) {
                let [field, value] = pair else {
                    return Err("a field without its value".into());
                };
                if let Some(start) = text(field).and_then(|f| f.parse::<i64>().ok()) {
                    let partials = text(value)
                        .and_then(parse_bucket)
                        .ok_or_else(|| format!("bucket {start} is not an array of numbers"))?;
                    answer.buckets.insert(start, partials);
                }
            }
            Ok(Ok(answer))
        })
        .collect()
}

/// A reply's text, borrowed.
fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// A bucket's stored partials, `[3,2469.12,null]`.
fn parse_bucket(text: &str) -> Option<Vec<Option<f64>>> {
    let inner = text.trim().strip_prefix('[')?.strip_suffix(']')?;
    inner
        .split(',')
        .map(|v| match v.trim() {
            "null" => Some(None),
            v => v.parse().ok().map(Some),
        })
        .collect()
}

/// Adds `partial` into `acc` by part: counts and sums add, a min or max keeps the extreme;
/// `None` is nothing to add.
fn merge(parts: &[Part], acc: &mut [Option<f64>], partial: &[Option<f64>]) {
    for ((part, a), x) in parts.iter().zip(acc.iter_mut()).zip(partial) {
        let Some(x) = *x else { continue };
        *a = Some(match (part, *a) {
            (_, None) => x,
            (Part::Min(_), Some(a)) => a.min(x),
            (Part::Max(_), Some(a)) => a.max(x),
            (_, Some(a)) => a + x,
        });
    }
}

/// Each event's partials per window and part (`(event * W + window) * P`), at its point in
/// time: the buckets the hash held before the call, with the entry's events applied in order
/// as the script did (its `outcomes`); an event too late for the windows gets none.
pub(super) fn windows(
    view: &View,
    answer: Answer,
    events: &[(i64, Vec<Option<f64>>)],
) -> Vec<Option<f64>> {
    let spec = &view.spec;
    let bucket = spec.bucket.as_millis() as i64;
    let lateness = spec.lateness.as_millis() as i64;
    let parts = &view.parts;
    // A bucket with nothing yet: counts and sums 0, no min or max.
    let empty: Vec<Option<f64>> = parts
        .iter()
        .map(|p| (!matches!(p, Part::Min(_) | Part::Max(_))).then_some(0.0))
        .collect();
    let Answer {
        outcomes,
        mut wm,
        mut buckets,
    } = answer;
    let (nw, np) = (spec.windows.len(), parts.len());
    let mut out = Vec::with_capacity(events.len() * nw * np);
    for (e, (ms, inputs)) in events.iter().enumerate() {
        let start = ms - ms.rem_euclid(bucket);
        if outcomes.get(e) == Some(&b'a') {
            // The event's own partial: it counts once, and its inputs by kind.
            let partial: Vec<Option<f64>> = parts
                .iter()
                .zip(inputs)
                .map(|(part, x)| match part {
                    Part::Count => Some(1.0),
                    Part::Matching(_) | Part::NonNull(_) => x.map(|_| 1.0),
                    Part::Sum(_) | Part::Min(_) | Part::Max(_) => *x,
                })
                .collect();
            let b = buckets.entry(start).or_insert_with(|| empty.clone());
            merge(parts, b, &partial);
            wm = Some(wm.map_or(*ms, |w| w.max(*ms)));
        }
        if wm.is_some_and(|w| *ms < w - lateness) {
            out.extend(std::iter::repeat_n(None, nw * np));
            continue;
        }
        for (_, len) in &spec.windows {
            let len = len.as_millis() as i64;
            let mut acc = empty.clone();
            for (_, b) in buckets.range(start - len + 1..=start) {
                merge(parts, &mut acc, b);
            }
            out.extend(acc);
        }
    }
    out
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
pub(super) fn columns(view: &View, rows: usize, results: &[Answered]) -> Vec<(String, ArrayRef)> {
    let spec = &view.spec;
    let (nw, np) = (spec.windows.len(), view.parts.len());
    let mut values: Vec<Vec<Option<f64>>> = vec![vec![None; rows]; spec.features.len() * nw];
    for (entry, partials) in results {
        for (e, &row) in entry.iter().enumerate() {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::AggregateFeature;

    /// A view of count, sum and max of `amount`, 1-minute buckets, 2- and 5-minute windows,
    /// 1 minute of lateness.
    fn view() -> View {
        let spec = AggregateSpec {
            name: "v".into(),
            key: vec![KeyPart::Text("k".into())],
            bucket: Duration::from_secs(60),
            lateness: Duration::from_secs(60),
            windows: vec![
                ("2m".into(), Duration::from_secs(120)),
                ("5m".into(), Duration::from_secs(300)),
            ],
            ttl: Duration::from_secs(3600),
            features: vec![
                AggregateFeature {
                    name: "n".into(),
                    function: Function::Count,
                },
                AggregateFeature {
                    name: "sum".into(),
                    function: Function::Sum("amount".into()),
                },
                AggregateFeature {
                    name: "max".into(),
                    function: Function::Max("amount".into()),
                },
            ],
        };
        View::new(&spec, true)
    }

    #[test]
    fn a_stored_bucket_reads_back_with_its_nulls() {
        assert_eq!(
            parse_bucket("[3,2469.12,null]"),
            Some(vec![Some(3.0), Some(2469.12), None])
        );
        assert_eq!(parse_bucket("[1,x]"), None);
        assert_eq!(parse_bucket("3,4"), None);
    }

    #[test]
    fn each_event_gets_its_windows_as_of_its_own_time() {
        let view = view();
        // Parts: n, s:amount, hi:amount. Stored: minute 0 (2 events, 10, max 7), minute 3.
        let answer = Answer {
            outcomes: b"arl".to_vec(),
            wm: Some(3 * 60_000),
            buckets: [
                (0, vec![Some(2.0), Some(10.0), Some(7.0)]),
                (180_000, vec![Some(1.0), Some(1.0), Some(1.0)]),
            ]
            .into(),
        };
        let events = vec![
            // Applied, minute 4: the 2m window holds minutes 3 and 4, the 5m one 0 to 4.
            (4 * 60_000 + 5, vec![None, Some(5.0), Some(5.0)]),
            // A replay at minute 3: what the hash holds (the first event is after it).
            (3 * 60_000 + 10_000, vec![None, Some(1.0), Some(1.0)]),
            // Too late once the watermark is at minute 4: no windows.
            (60_000, vec![None, Some(2.0), Some(2.0)]),
        ];
        let got = windows(&view, answer.clone(), &events);
        let s = |v: &[f64]| v.iter().map(|x| Some(*x)).collect::<Vec<_>>();
        let mut want = s(&[2.0, 6.0, 5.0, 4.0, 16.0, 7.0]);
        want.extend(s(&[1.0, 1.0, 1.0, 3.0, 11.0, 7.0]));
        want.extend([None; 6]);
        assert_eq!(got, want);
        assert_eq!(
            answer.counts(),
            Counts {
                applied: 1,
                replayed: 1,
                late: 1
            }
        );
    }

    #[test]
    fn a_reply_has_an_outcome_per_entry_and_a_refused_key_its_reason() {
        let bulk = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        let value = Value::Array(vec![
            Value::Array(vec![
                bulk("a"),
                bulk("60000"),
                bulk("_wm"),
                bulk("60000"),
                bulk("60000"),
                bulk("[1,2,2]"),
            ]),
            Value::Array(vec![bulk("error"), bulk("WRONGTYPE no hash")]),
        ]);
        let outcomes = reply(value.clone(), 2).unwrap();
        let first = outcomes[0].as_ref().unwrap();
        assert_eq!(first.wm, Some(60_000));
        assert_eq!(first.buckets.len(), 1, "only numeric fields are buckets");
        assert_eq!(outcomes[1], Err("WRONGTYPE no hash".into()));
        assert!(reply(value, 3).is_err(), "an entry missing is an error");
    }
}
