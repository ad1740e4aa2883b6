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
//! | `_lo` | no bucket starts before it: the later of the first bucket ever written and the bucket after the horizon |
//! | `_v` | the last write's version, unique to it (a writer's snapshot of the hash is current while it is unchanged) |
//!
//! **Semantics** ([`state::Rules`]): an entry is one entity's events of one source partition,
//! `(offset, event ms, partial inputs)` in offset order. An event at or below the entry's guard
//! is a replay and changes nothing; an event more than the lateness behind `_wm` is too late
//! (counted, not applied; its guard moves); any other lands in the bucket `ts - ts % bucket`.
//! The guard, `_wm` and the buckets change in one script, so a replay after a crash, a
//! duplicate delivery or a group reset never counts an event twice. Buckets at or before the
//! horizon `bucket(_wm - lateness) - longest window` are deleted in the same script, and the
//! key's EXPIRE is refreshed (`ttl`): an entity quiet for that long disappears with its
//! guards. A call whose events are all replays writes nothing.
//!
//! **Writes.** sluice keeps a snapshot of each hash it writes, as its write left it (within
//! `sink.redis.aggregate_cache`, the entities written most recently). An entry whose snapshot
//! is current is applied here ([`state`]), and only what changes goes to Redis, by
//! compare-and-set ([`SWAP`]): the fields are set only if the hash's `_v` is still the
//! snapshot's, else nothing is written and the entry goes the other way. Every other entry runs
//! the write script ([`WRITE`]), which applies its events in Redis and returns the hash as it
//! was (when sluice keeps snapshots or sums windows), from which sluice applies the same events
//! to make the snapshot, checking that it decides every event as the script did. Either way
//! one call carries up to [`KEYS_PER_CALL`] entries (on a cluster one: a script's keys must
//! share a slot). Redis's work per entity is then one small read and one write: decoding and
//! re-encoding buckets in Lua for every event had been most of its time.
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

mod state;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use arrow::{
    array::{ArrayRef, Float64Array},
    record_batch::RecordBatch,
};
use redis::Value;

use self::state::{bucket_text, parse_bucket, Applied, Event, Rules, Snapshot, Snapshots, State};
use crate::{
    config::{AggregateSpec, Function, KeyPart, Part},
    util::text::{encode, render_key},
};

/// The write script (`write.lua`, which documents its arguments and reply): one
/// call carries the events of up to [`KEYS_PER_CALL`] entities of one view.
pub(super) const WRITE: &str = include_str!("write.lua");

/// The compare-and-set script (`swap.lua`, which documents its arguments and reply): one call
/// carries the changes of up to [`KEYS_PER_CALL`] entities.
pub(super) const SWAP: &str = include_str!("swap.lua");

/// Entities per call on a standalone server (on a cluster one, as a script's keys must
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
    /// Whether a model takes its features: then each event's windows are summed.
    enrich: bool,
    /// The arguments every call of the write script for this view starts with.
    head: Vec<String>,
    /// The key's EXPIRE, in seconds.
    ttl: String,
    /// This writer's snapshots of the view's hashes (none with no memory for them).
    snapshots: Option<Mutex<Snapshots>>,
    /// This writer's `_v` values: `<instance>.<sequence>`, unique across writers and restarts.
    instance: u64,
    sequence: AtomicU64,
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
    /// The view `spec` for writing; `enrich`: a model reads its features; `memory`: bytes for
    /// snapshots of its hashes (0: none).
    pub(super) fn new(spec: &AggregateSpec, enrich: bool, memory: usize) -> Self {
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
        let snapshots = (memory > 0).then(|| Mutex::new(Snapshots::new(memory)));
        let ttl = spec.ttl.as_secs().max(1).to_string();
        let mut head = vec![
            spec.bucket.as_millis().to_string(),
            spec.lateness.as_millis().to_string(),
            spec.longest().as_millis().to_string(),
            ttl.clone(),
            spec.description(),
            parts.len().to_string(),
        ];
        head.extend(parts.iter().map(|p| p.kind().to_owned()));
        // The hash as it was comes back when sluice needs it: to sum the windows, or to make
        // a snapshot.
        let want = enrich || snapshots.is_some();
        head.push(if want { "1" } else { "0" }.into());
        Self {
            spec: spec.clone(),
            parts,
            inputs,
            enrich,
            head,
            ttl,
            snapshots,
            instance: rand::random(),
            sequence: AtomicU64::new(0),
        }
    }

    pub(super) fn enriches(&self) -> bool {
        self.enrich
    }

    fn rules(&self) -> Rules<'_> {
        Rules {
            spec: &self.spec,
            parts: &self.parts,
        }
    }

    /// A `_v` no write has used.
    fn next_version(&self) -> String {
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        format!("{:x}.{n:x}", self.instance)
    }

    fn snapshots(&self) -> Option<std::sync::MutexGuard<'_, Snapshots>> {
        self.snapshots
            .as_ref()
            .map(|s| s.lock().expect("the snapshots' lock is not poisoned"))
    }

    fn keep(&self, key: &str, snapshot: Snapshot) {
        if let Some(mut s) = self.snapshots() {
            s.keep(key.to_owned(), snapshot);
        }
    }

    /// One part's input for `row`: the column's value, 1 when the row matches a condition,
    /// `None` for nothing.
    fn input(input: &Input, batch: &RecordBatch, row: usize) -> Option<f64> {
        let column = |c: &str| batch.column_by_name(c).expect("validated column");
        match input {
            Input::None => None,
            Input::Equals { column: c, value } => {
                (encode(column(c), row).as_deref() == Some(value.as_str())).then_some(1.0)
            }
            Input::Value(c) => match encode(column(c), row)?.as_str() {
                "true" => Some(1.0),
                "false" => Some(0.0),
                v => v.parse().ok(),
            },
        }
    }

    /// The event of `row` (`offset`, event time `micros`), with each part's input.
    fn event(&self, batch: &RecordBatch, row: usize, offset: i64, micros: i64) -> Event {
        Event {
            offset,
            ms: micros.div_euclid(1_000),
            inputs: self
                .inputs
                .iter()
                .map(|i| View::input(i, batch, row))
                .collect(),
        }
    }

    /// Takes an entry's own way: applied here against its current snapshot (done if it
    /// changes nothing, else a compare-and-set), or through the write script.
    pub(super) fn prepare(&self, mut entry: Entry) -> Prepared {
        let Some(snapshot) = entry.snapshot.take() else {
            return Prepared::Written(entry);
        };
        let mut state = snapshot.state;
        let applied =
            self.rules()
                .apply(&mut state, &entry.guard, &entry.events, None, self.enrich);
        if !applied.moved {
            // Replays only: nothing to write, and the hash is as the snapshot has it.
            self.keep(
                &entry.key,
                Snapshot {
                    version: snapshot.version,
                    state,
                },
            );
            return Prepared::Done(Finished::new(entry, applied));
        }
        Prepared::Swapped(Box::new(Swap {
            seen: snapshot.version,
            version: self.next_version(),
            entry,
            state,
            applied,
        }))
    }

    /// A compare-and-set that Redis took: the entry is done, and its state the snapshot.
    pub(super) fn swapped(&self, swap: Box<Swap>) -> Finished {
        self.keep(
            &swap.entry.key,
            Snapshot {
                version: swap.version,
                state: swap.state,
            },
        );
        Finished::new(swap.entry, swap.applied)
    }

    /// The write script's answer for an entry that the call wrote with `version`: the
    /// events' outcomes and windows, and the snapshot it leaves, when the hash came back and
    /// sluice decides every event as the script did.
    pub(super) fn written(&self, entry: Entry, version: &str, answer: Answer) -> Finished {
        let Answer { outcomes, before } = answer;
        let Some(before) = before else {
            return Finished::new(
                entry,
                Applied {
                    outcomes,
                    ..Default::default()
                },
            );
        };
        let mut state = before.state;
        let applied = self.rules().apply(
            &mut state,
            &entry.guard,
            &entry.events,
            Some(&outcomes),
            self.enrich,
        );
        if applied.disagrees {
            tracing::warn!(view = %self.spec.name, key = %entry.key, outcomes = %String::from_utf8_lossy(&outcomes),
                "The write script decided an event otherwise than sluice would; no snapshot is kept.");
        }
        let version = if applied.moved {
            Some(version.to_owned())
        } else {
            before.version
        };
        if let (Some(version), true, false) = (version, before.same_parts, applied.disagrees) {
            self.keep(&entry.key, Snapshot { version, state });
        }
        Finished::new(entry, applied)
    }
}

/// One entity's events of one partition.
pub(super) struct Entry {
    pub(super) view: usize,
    pub(super) key: String,
    /// Its guard field, `_o:<topic>:<partition>`.
    guard: String,
    /// Batch rows, in offset order.
    pub(super) rows: Vec<usize>,
    events: Vec<Event>,
    /// This writer's snapshot of the hash, if it has one and the entity has no other entry
    /// in the batch (whose write could come first).
    snapshot: Option<Snapshot>,
}

/// The entries of view `v` for a batch: its events grouped by (entity, topic, partition), each
/// with its snapshot taken out. Rows with `skip` set are left out; `times` are event times
/// in µs.
pub(super) fn plan(
    v: usize,
    view: &View,
    batch: &RecordBatch,
    skip: &[bool],
    times: &[i64],
) -> Vec<Entry> {
    let (topics, partitions, offsets) = crate::schema::provenance(batch);
    let mut order = Vec::new();
    let mut groups: HashMap<(String, &str, i32), Vec<usize>> = HashMap::new();
    let mut entries_of: HashMap<String, usize> = HashMap::new();
    for row in (0..batch.num_rows()).filter(|r| !skip[*r]) {
        let key = render_key(&view.spec.key, batch, row);
        groups
            .entry((key, topics.value(row), partitions.value(row)))
            .or_insert_with_key(|k| {
                *entries_of.entry(k.0.clone()).or_default() += 1;
                order.push(k.clone());
                Vec::new()
            })
            .push(row);
    }
    let mut snapshots = view.snapshots();
    order
        .into_iter()
        .map(|group| {
            let mut rows = groups.remove(&group).expect("grouped above");
            rows.sort_by_key(|r| offsets.value(*r));
            let (key, topic, partition) = group;
            let snapshot = snapshots
                .as_mut()
                .and_then(|s| s.take(&key))
                .filter(|_| entries_of[&key] == 1);
            let events = rows
                .iter()
                .map(|&row| view.event(batch, row, offsets.value(row), times[row]))
                .collect();
            Entry {
                view: v,
                key,
                guard: format!("_o:{topic}:{partition}"),
                rows,
                events,
                snapshot,
            }
        })
        .collect()
}

/// Which way an entry goes.
pub(super) enum Prepared {
    /// Nothing to write.
    Done(Finished),
    /// A compare-and-set of what changes.
    Swapped(Box<Swap>),
    /// The write script.
    Written(Entry),
}

/// An entry applied against its current snapshot, to be set in Redis if the hash is still
/// the snapshot's.
pub(super) struct Swap {
    pub(super) entry: Entry,
    seen: String,
    version: String,
    state: State,
    applied: Applied,
}

impl Swap {
    /// The swap script's arguments for this entry (see `swap.lua`).
    pub(super) fn args(&self, ttl: &str, out: &mut Vec<String>) {
        out.push(self.seen.clone());
        out.push(ttl.to_owned());
        let written = &self.applied.written;
        out.push((4 + written.len()).to_string());
        let last = self
            .state
            .guards
            .iter()
            .find(|(g, _)| *g == self.entry.guard)
            .map_or(-1, |g| g.1);
        out.push(self.entry.guard.clone());
        out.push(last.to_string());
        for (field, value) in [("_wm", self.state.wm), ("_lo", self.state.lo)] {
            out.push(field.to_owned());
            out.push(value.unwrap_or_default().to_string());
        }
        out.push("_v".to_owned());
        out.push(self.version.clone());
        for start in written {
            let partials = self
                .state
                .buckets
                .get(*start)
                .expect("a bucket written is kept");
            out.push(start.to_string());
            out.push(bucket_text(partials));
        }
        out.push(self.applied.deleted.len().to_string());
        out.extend(self.applied.deleted.iter().map(i64::to_string));
    }
}

/// The swap script's calls for `swaps`, `per_call` entries each: (keys, args).
pub(super) fn swap_calls(
    views: &[View],
    swaps: &[Box<Swap>],
    per_call: usize,
) -> Vec<(Vec<String>, Vec<String>)> {
    swaps
        .chunks(per_call.max(1))
        .map(|chunk| {
            let mut args = Vec::new();
            for s in chunk {
                s.args(&views[s.entry.view].ttl, &mut args);
            }
            (chunk.iter().map(|s| s.entry.key.clone()).collect(), args)
        })
        .collect()
}

/// The write script's calls for `entries` (all of one view), `per_call` entries each, and the
/// `_v` each entry is written with: (keys, args, versions).
pub(super) fn write_calls(
    view: &View,
    entries: &[Entry],
    per_call: usize,
) -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
    let number = |x: Option<f64>| x.map_or_else(String::new, |v| v.to_string());
    entries
        .chunks(per_call.max(1))
        .map(|chunk| {
            let mut args = view.head.clone();
            let mut versions = Vec::with_capacity(chunk.len());
            for entry in chunk {
                // Every write moves `_v`, whether or not this writer keeps snapshots: any
                // other writer's snapshot of the hash is then no longer current.
                let version = view.next_version();
                args.push(entry.guard.clone());
                args.push(version.clone());
                args.push(entry.events.len().to_string());
                for e in &entry.events {
                    args.push(e.offset.to_string());
                    args.push(e.ms.to_string());
                    args.extend(e.inputs.iter().map(|x| number(*x)));
                }
                versions.push(version);
            }
            (
                chunk.iter().map(|e| e.key.clone()).collect(),
                args,
                versions,
            )
        })
        .collect()
}

/// An entry done: its rows, what became of its events, and their windows (views that enrich).
pub(super) struct Finished {
    pub(super) view: usize,
    pub(super) rows: Vec<usize>,
    outcomes: Vec<u8>,
    partials: Vec<Option<f64>>,
}

impl Finished {
    fn new(entry: Entry, applied: Applied) -> Self {
        Self {
            view: entry.view,
            rows: entry.rows,
            outcomes: applied.outcomes,
            partials: applied.partials,
        }
    }

    pub(super) fn counts(&self) -> Counts {
        let n = |c: u8| self.outcomes.iter().filter(|o| **o == c).count() as u64;
        Counts {
            applied: n(b'a'),
            replayed: n(b'r'),
            late: n(b'l'),
        }
    }
}

/// What became of a view's events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) applied: u64,
    pub(super) replayed: u64,
    pub(super) late: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Self) {
        self.applied += o.applied;
        self.replayed += o.replayed;
        self.late += o.late;
    }
}

/// The hash as the write script read it before the call.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Before {
    state: State,
    /// Its `_v`.
    version: Option<String>,
    /// Whether its `_parts` is the view's (else its buckets were dropped).
    same_parts: bool,
}

impl Before {
    /// A hash from its fields and values (its `_wm` given apart, as the write script
    /// returns it before the fields).
    fn read<'a>(
        view: &View,
        wm: Option<i64>,
        fields: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let mut before = Before {
            state: State::empty(view.parts.len()),
            version: None,
            same_parts: true,
        };
        before.state.wm = wm;
        for (field, value) in fields {
            if let Ok(start) = field.parse::<i64>() {
                let partials = parse_bucket(value)
                    .filter(|p| p.len() == view.parts.len())
                    .ok_or_else(|| format!("bucket {start} is not {:?}", view.parts))?;
                before.state.buckets.insert(start, &partials);
            } else if field == "_lo" {
                before.state.lo = value.parse().ok();
            } else if field == "_v" {
                before.version = Some(value.to_owned());
            } else if field == "_parts" {
                before.same_parts = value == view.head[4];
            } else if field.starts_with("_o:") {
                let offset = value
                    .parse()
                    .map_err(|_| format!("guard {field}: {value}"))?;
                before.state.guards.push((field.to_owned(), offset));
            }
        }
        // A hash from before `_lo` existed: the script takes its first bucket.
        if before.state.lo.is_none() && before.state.wm.is_some() {
            before.state.lo = before.state.buckets.first();
        }
        Ok(before)
    }
}

/// Each request row's windows in `view`, as if the row were its entity's next event: the
/// hash as it is (`hashes`, by key; `keys` per row), with the row's own values added, nothing
/// written. A hash that cannot be read (another view's, another definition) counts as empty.
pub(super) fn as_next_events(
    view: &View,
    batch: &RecordBatch,
    times: &[i64],
    keys: &[String],
    hashes: &HashMap<String, Vec<(String, String)>>,
) -> Vec<(String, ArrayRef)> {
    let mut states: HashMap<&str, State> = HashMap::new();
    let rules = view.rules();
    let finished: Vec<Finished> = (0..batch.num_rows())
        .map(|row| {
            let state = states.entry(keys[row].as_str()).or_insert_with(|| {
                let fields = hashes
                    .get(&keys[row])
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let wm = fields
                    .iter()
                    .find(|(f, _)| f == "_wm")
                    .and_then(|(_, v)| v.parse().ok());
                Before::read(
                    view,
                    wm,
                    fields.iter().map(|(f, v)| (f.as_str(), v.as_str())),
                )
                .ok()
                .filter(|b| b.same_parts)
                .map_or_else(|| State::empty(view.parts.len()), |b| b.state)
            });
            let event = view.event(batch, row, 0, times[row]);
            // No guard: the request is no replay of anything.
            let applied = rules.apply(&mut state.clone(), "", &[event], None, true);
            Finished {
                view: 0,
                rows: vec![row],
                outcomes: applied.outcomes,
                partials: applied.partials,
            }
        })
        .collect();
    columns(view, batch.num_rows(), finished.iter())
}

/// What the write script did with one entry.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Answer {
    /// Per event: `a` applied, `r` a replay, `l` too late.
    outcomes: Vec<u8>,
    /// With want, the hash before the call.
    before: Option<Before>,
}

/// One entry's answer, or why Redis refused its key.
pub(super) type Outcome = Result<Answer, String>;

/// Reads a write call's reply: one outcome per entry, in the call's order.
pub(super) fn reply(view: &View, value: Value, entries: usize) -> Result<Vec<Outcome>, String> {
    let Value::Array(items) = value else {
        return Err(format!("expected an array, got {value:?}"));
    };
    if items.len() != entries {
        return Err(format!("expected {entries} entries, got {}", items.len()));
    }
    let want = view.head.last().map(String::as_str) == Some("1");
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
            let outcomes = first.as_bytes().to_vec();
            if !want {
                return Ok(Ok(Answer {
                    outcomes,
                    before: None,
                }));
            }
            let mut pairs = Vec::with_capacity(fields.len() / 2);
            for pair in fields[2..].chunks(2) {
                let [field, value] = pair else {
                    return Err("a field without its value".into());
                };
                let (Some(field), Some(value)) = (text(field), text(value)) else {
                    return Err("a field or value that is not text".into());
                };
                pairs.push((field, value));
            }
            let wm = text(&fields[1]).and_then(|w| w.parse().ok());
            Ok(Ok(Answer {
                outcomes,
                before: Some(Before::read(view, wm, pairs)?),
            }))
        })
        .collect()
}

/// Reads a swap call's reply: per entry, whether it was written, or why Redis refused its key.
pub(super) fn swapped(value: Value, entries: usize) -> Result<Vec<Result<bool, String>>, String> {
    let Value::Array(items) = value else {
        return Err(format!("expected an array, got {value:?}"));
    };
    if items.len() != entries {
        return Err(format!("expected {entries} entries, got {}", items.len()));
    }
    items
        .into_iter()
        .map(|item| match item {
            Value::Int(1) => Ok(Ok(true)),
            Value::Int(0) => Ok(Ok(false)),
            Value::Array(e) if e.len() == 2 && text(&e[0]) == Some("error") => {
                Ok(Err(text(&e[1]).unwrap_or_default().to_owned()))
            }
            other => Err(format!("expected 1, 0 or an error, got {other:?}")),
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
/// its finished entries' partials.
pub(super) fn columns<'a>(
    view: &View,
    rows: usize,
    finished: impl Iterator<Item = &'a Finished>,
) -> Vec<(String, ArrayRef)> {
    let spec = &view.spec;
    let (nw, np) = (spec.windows.len(), view.parts.len());
    let mut values: Vec<Vec<Option<f64>>> = vec![vec![None; rows]; spec.features.len() * nw];
    for done in finished {
        for (e, &row) in done.rows.iter().enumerate() {
            for w in 0..nw {
                let at = (e * nw + w) * np;
                let Some(window) = done.partials.get(at..at + np) else {
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
    use super::*;

    fn bulk(t: &str) -> Value {
        Value::BulkString(t.as_bytes().to_vec())
    }

    #[test]
    fn a_write_reply_gives_each_entry_its_hash_before_and_a_refused_key_its_reason() {
        let spec = state::tests::spec();
        let view = View::new(&spec, true, 1 << 20);
        let value = Value::Array(vec![
            Value::Array(vec![
                bulk("a"),
                bulk("60000"),
                bulk("_wm"),
                bulk("60000"),
                bulk("_parts"),
                bulk(&spec.description()),
                bulk("_o:t:0"),
                bulk("7"),
                bulk("_v"),
                bulk("x.1"),
                bulk("60000"),
                bulk("[1,2,2]"),
            ]),
            Value::Array(vec![bulk("error"), bulk("WRONGTYPE no hash")]),
        ]);
        let outcomes = reply(&view, value.clone(), 2).unwrap();
        let first = outcomes[0].as_ref().unwrap().before.clone().unwrap();
        assert_eq!(first.state.wm, Some(60_000));
        assert_eq!(
            first.state.buckets.len(),
            1,
            "only numeric fields are buckets"
        );
        assert_eq!(first.state.lo, Some(60_000), "no `_lo`: the first bucket");
        assert_eq!(first.state.guards, vec![("_o:t:0".to_owned(), 7)]);
        assert_eq!(first.version.as_deref(), Some("x.1"));
        assert!(first.same_parts);
        assert_eq!(outcomes[1], Err("WRONGTYPE no hash".into()));
        assert!(
            reply(&view, value, 3).is_err(),
            "an entry missing is an error"
        );
    }

    #[test]
    fn a_swap_reply_says_which_entries_were_written() {
        let value = Value::Array(vec![
            Value::Int(1),
            Value::Int(0),
            Value::Array(vec![bulk("error"), bulk("WRONGTYPE")]),
        ]);
        assert_eq!(
            swapped(value, 3).unwrap(),
            vec![Ok(true), Ok(false), Err("WRONGTYPE".into())]
        );
        assert!(swapped(Value::Array(vec![Value::Int(2)]), 1).is_err());
    }

    #[test]
    fn versions_are_unique_to_each_write() {
        let view = View::new(&state::tests::spec(), false, 0);
        let other = View::new(&state::tests::spec(), false, 0);
        let (a, b, c) = (
            view.next_version(),
            view.next_version(),
            other.next_version(),
        );
        assert!(a != b && a != c && b != c);
    }
}
