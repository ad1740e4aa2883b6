//! An entity's aggregate hash as sluice holds it in memory, and the write semantics applied to
//! it: the one Rust rendering of what `write.lua` does in Redis, used to sum each event's
//! windows and, while sluice's snapshot of the hash is current, to compute the write itself.

use std::collections::HashMap;

use crate::config::{AggregateSpec, Part};

/// A bucket's partials in `_parts` order; `NaN` stands for null (a min or max with no value).
pub(super) type Partials = [f64];

/// The buckets of one hash, by start: sorted starts, and their partials side by side.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Buckets {
    parts: usize,
    starts: Vec<i64>,
    values: Vec<f64>,
}

impl Buckets {
    pub(super) fn new(parts: usize) -> Self {
        Self {
            parts,
            starts: Vec::new(),
            values: Vec::new(),
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.starts.len()
    }

    /// The partials of the bucket at `start`, added (as `empty`) when there is none.
    fn entry(&mut self, start: i64, empty: &Partials) -> &mut Partials {
        let p = self.parts;
        let at = match self.starts.binary_search(&start) {
            Ok(at) => at,
            Err(at) => {
                self.starts.insert(at, start);
                self.values.splice(at * p..at * p, empty.iter().copied());
                at
            }
        };
        &mut self.values[at * p..(at + 1) * p]
    }

    /// Stores a bucket read from the hash (starts may come in any order).
    pub(super) fn insert(&mut self, start: i64, partials: &Partials) {
        debug_assert_eq!(partials.len(), self.parts);
        self.entry(start, partials).copy_from_slice(partials);
    }

    pub(super) fn get(&self, start: i64) -> Option<&Partials> {
        let at = self.starts.binary_search(&start).ok()?;
        Some(&self.values[at * self.parts..(at + 1) * self.parts])
    }

    /// The buckets whose start is in `from..=to`.
    fn range(&self, from: i64, to: i64) -> impl Iterator<Item = &Partials> {
        let a = self.starts.partition_point(|s| *s < from);
        let b = self.starts.partition_point(|s| *s <= to);
        self.values[a * self.parts..b * self.parts].chunks_exact(self.parts.max(1))
    }

    /// Removes the buckets at or before `horizon`; returns their starts.
    fn trim(&mut self, horizon: i64) -> Vec<i64> {
        let n = self.starts.partition_point(|s| *s <= horizon);
        self.values.drain(..n * self.parts);
        self.starts.drain(..n).collect()
    }

    pub(super) fn first(&self) -> Option<i64> {
        self.starts.first().copied()
    }
}

/// One entity's hash, as far as writes and windows go.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct State {
    /// `_wm`: the newest applied event time (ms).
    pub(super) wm: Option<i64>,
    /// `_lo`: no bucket starts before it.
    pub(super) lo: Option<i64>,
    /// The guards, `_o:<topic>:<partition>` → the last offset applied or judged too late.
    pub(super) guards: Vec<(String, i64)>,
    pub(super) buckets: Buckets,
}

impl State {
    pub(super) fn empty(parts: usize) -> Self {
        Self {
            buckets: Buckets::new(parts),
            ..Default::default()
        }
    }

    fn guard(&self, field: &str) -> Option<i64> {
        self.guards.iter().find(|(f, _)| f == field).map(|g| g.1)
    }

    fn set_guard(&mut self, field: &str, offset: i64) {
        match self.guards.iter_mut().find(|(f, _)| f == field) {
            Some(g) => g.1 = offset,
            None => self.guards.push((field.to_owned(), offset)),
        }
    }

    /// About how many bytes it holds.
    fn size(&self) -> usize {
        96 + self.guards.iter().map(|(f, _)| 40 + f.len()).sum::<usize>()
            + self.buckets.starts.capacity() * 8
            + self.buckets.values.capacity() * 8
    }
}

/// One event of an entry: its offset, event time (ms) and each part's input (`None`: no value,
/// or a condition it does not match).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Event {
    pub(super) offset: i64,
    pub(super) ms: i64,
    pub(super) inputs: Vec<Option<f64>>,
}

/// What applying an entry's events did.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Applied {
    /// Per event: `a` applied, `r` a replay, `l` too late.
    pub(super) outcomes: Vec<u8>,
    /// With `windows`, each event's partials per window and part (`(event * W + window) * P`,
    /// `None` for null) at its point in time.
    pub(super) partials: Vec<Option<f64>>,
    /// Whether the hash changes (an event was applied or judged too late): else the script
    /// writes nothing.
    pub(super) moved: bool,
    /// Buckets the events changed that the hash keeps, and bucket starts to delete.
    pub(super) written: Vec<i64>,
    pub(super) deleted: Vec<i64>,
    /// Whether an outcome given by the script differs from what these rules decide.
    pub(super) disagrees: bool,
}

/// A view's write semantics, as `write.lua` has them (and the README documents): an event at
/// or below its partition's guard is a replay; one more than the lateness behind `_wm` is too
/// late; any other is added to the bucket `ms - ms % bucket`. Then, if anything moved, buckets
/// at or before the horizon `bucket(_wm - lateness) - longest` are deleted, and `_lo` becomes
/// the later of itself and the bucket after the horizon.
pub(super) struct Rules<'a> {
    pub(super) spec: &'a AggregateSpec,
    pub(super) parts: &'a [Part],
}

impl Rules<'_> {
    fn bucket(&self) -> i64 {
        self.spec.bucket.as_millis() as i64
    }

    /// A bucket with nothing yet: counts and sums 0, no min or max.
    fn empty(&self) -> Vec<f64> {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Min(_) | Part::Max(_) => f64::NAN,
                _ => 0.0,
            })
            .collect()
    }

    /// Applies `events` (one partition's, in offset order, guarded by `guard`) to `state`, as
    /// the script does, or following `given` outcomes (the script's, when it applied them);
    /// with `windows`, also each event's windows as of its own time over the hash with it
    /// applied.
    pub(super) fn apply(
        &self,
        state: &mut State,
        guard: &str,
        events: &[Event],
        given: Option<&[u8]>,
        windows: bool,
    ) -> Applied {
        let bucket = self.bucket();
        let lateness = self.spec.lateness.as_millis() as i64;
        let empty = self.empty();
        let mut last = state.guard(guard).unwrap_or(-1);
        let mut out = Applied {
            outcomes: Vec::with_capacity(events.len()),
            ..Default::default()
        };
        let mut dirty: Vec<i64> = Vec::new();
        for (e, event) in events.iter().enumerate() {
            let start = event.ms - event.ms.rem_euclid(bucket);
            let rule = if event.offset <= last {
                b'r'
            } else if state.wm.is_some_and(|w| event.ms < w - lateness) {
                b'l'
            } else {
                b'a'
            };
            let outcome = given.and_then(|g| g.get(e).copied()).unwrap_or(rule);
            out.disagrees |= outcome != rule;
            match outcome {
                b'a' => {
                    let b = state.buckets.entry(start, &empty);
                    for ((part, x), input) in self.parts.iter().zip(b.iter_mut()).zip(&event.inputs)
                    {
                        add(part, x, *input);
                    }
                    if !dirty.contains(&start) {
                        dirty.push(start);
                    }
                    state.lo = Some(state.lo.map_or(start, |lo| lo.min(start)));
                    state.wm = Some(state.wm.map_or(event.ms, |w| w.max(event.ms)));
                    last = event.offset;
                    out.moved = true;
                }
                b'l' => {
                    last = event.offset;
                    out.moved = true;
                }
                _ => {}
            }
            out.outcomes.push(outcome);
            if windows {
                self.windows(state, event.ms, &mut out.partials);
            }
        }
        if let (true, Some(wm)) = (out.moved, state.wm) {
            let edge = wm - lateness;
            let horizon = edge - edge.rem_euclid(bucket) - self.spec.longest().as_millis() as i64;
            out.deleted = state.buckets.trim(horizon);
            // A bucket the events made at or before the horizon is not written, and deleting
            // it is harmless.
            for start in &dirty {
                if *start <= horizon && !out.deleted.contains(start) {
                    out.deleted.push(*start);
                }
            }
            dirty.retain(|s| *s > horizon);
            state.lo = Some(match state.lo {
                Some(lo) if lo > horizon => lo,
                _ => horizon + bucket,
            });
            state.set_guard(guard, last);
            out.written = dirty;
        }
        out
    }

    /// The partials of the windows ending at `ms` (nulls when it is too late), appended.
    fn windows(&self, state: &State, ms: i64, out: &mut Vec<Option<f64>>) {
        let (nw, np) = (self.spec.windows.len(), self.parts.len());
        let lateness = self.spec.lateness.as_millis() as i64;
        if state.wm.is_some_and(|w| ms < w - lateness) {
            out.extend(std::iter::repeat_n(None, nw * np));
            return;
        }
        let start = ms - ms.rem_euclid(self.bucket());
        let empty = self.empty();
        for (_, len) in &self.spec.windows {
            let len = len.as_millis() as i64;
            let mut acc = empty.clone();
            for b in state.buckets.range(start - len + 1, start) {
                for ((part, a), x) in self.parts.iter().zip(acc.iter_mut()).zip(b) {
                    merge(part, a, *x);
                }
            }
            out.extend(acc.into_iter().map(|x| (!x.is_nan()).then_some(x)));
        }
    }
}

/// Adds one event's input to a bucket's partial, as the script does: a count counts the event,
/// a condition or a non-null count counts a value, a sum adds it, a min or max keeps the
/// extreme; no value adds nothing.
fn add(part: &Part, x: &mut f64, input: Option<f64>) {
    match (part, input) {
        (Part::Count, _) => *x += 1.0,
        (_, None) => {}
        (Part::Matching(_) | Part::NonNull(_), Some(_)) => *x += 1.0,
        (Part::Sum(_), Some(v)) => *x += v,
        (Part::Min(_), Some(v)) => {
            if x.is_nan() || v < *x {
                *x = v
            }
        }
        (Part::Max(_), Some(v)) => {
            if x.is_nan() || v > *x {
                *x = v
            }
        }
    }
}

/// Merges a bucket's partial into a window's: counts and sums add, a min or max keeps the
/// extreme; a null (NaN) adds nothing.
fn merge(part: &Part, acc: &mut f64, x: f64) {
    if x.is_nan() {
        return;
    }
    *acc = match part {
        Part::Min(_) if !acc.is_nan() => acc.min(x),
        Part::Max(_) if !acc.is_nan() => acc.max(x),
        Part::Min(_) | Part::Max(_) => x,
        _ => *acc + x,
    };
}

/// A bucket's partials as the hash stores them: a JSON array, `null` for a min or max with no
/// value (each number the shortest text that reads back as the same double).
pub(super) fn bucket_text(partials: &Partials) -> String {
    let mut out = String::with_capacity(8 * partials.len() + 2);
    out.push('[');
    for (i, x) in partials.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if x.is_nan() {
            out.push_str("null");
        } else {
            use std::fmt::Write;
            let _ = write!(out, "{x}");
        }
    }
    out.push(']');
    out
}

/// A bucket as stored, `[3,2469.12,null]`, back into partials.
pub(super) fn parse_bucket(text: &str) -> Option<Vec<f64>> {
    let inner = text.trim().strip_prefix('[')?.strip_suffix(']')?;
    inner
        .split(',')
        .map(|v| match v.trim() {
            "null" => Some(f64::NAN),
            v => v.parse().ok(),
        })
        .collect()
}

/// sluice's copy of one hash as its last write left it, and that write's `_v`.
#[derive(Debug, Clone)]
pub(super) struct Snapshot {
    pub(super) version: String,
    pub(super) state: State,
}

/// A writer's snapshots of the hashes of one view, by key, within a memory budget, in two
/// generations: a snapshot kept goes into the young one; when that holds half the budget, the
/// old one is dropped and the young one becomes old. So the entities written recently stay,
/// as with an LRU, without its bookkeeping. A snapshot is taken out while its write runs.
pub(super) struct Snapshots {
    young: HashMap<String, (Snapshot, usize)>,
    old: HashMap<String, (Snapshot, usize)>,
    young_bytes: usize,
    budget: usize,
}

impl Snapshots {
    pub(super) fn new(budget: usize) -> Self {
        Self {
            young: HashMap::new(),
            old: HashMap::new(),
            young_bytes: 0,
            budget,
        }
    }

    pub(super) fn take(&mut self, key: &str) -> Option<Snapshot> {
        if let Some((s, bytes)) = self.young.remove(key) {
            self.young_bytes -= bytes;
            return Some(s);
        }
        self.old.remove(key).map(|(s, _)| s)
    }

    pub(super) fn keep(&mut self, key: String, snapshot: Snapshot) {
        let bytes = 64 + key.len() + snapshot.version.len() + snapshot.state.size();
        self.old.remove(&key);
        if let Some((_, was)) = self.young.insert(key, (snapshot, bytes)) {
            self.young_bytes -= was;
        }
        self.young_bytes += bytes;
        if self.young_bytes > self.budget / 2 {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
    }

    /// Bytes the young generation holds, and how many snapshots the old one does.
    #[cfg(test)]
    pub(super) fn held(&self) -> (usize, usize) {
        (self.young_bytes, self.old.len())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{AggregateFeature, Function, KeyPart};

    /// Count, sum and max of `amount`, 1-minute buckets, 2- and 5-minute windows, 1 minute of
    /// lateness.
    pub(crate) fn spec() -> AggregateSpec {
        AggregateSpec {
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
        }
    }

    fn spec_and_parts() -> (AggregateSpec, Vec<Part>) {
        let spec = spec();
        let parts = spec.parts();
        (spec, parts)
    }

    fn event(offset: i64, ms: i64, amount: f64) -> Event {
        Event {
            offset,
            ms,
            inputs: vec![None, Some(amount), Some(amount)],
        }
    }

    #[test]
    fn events_apply_as_the_script_applies_them_and_see_their_own_windows() {
        let (spec, parts) = spec_and_parts();
        let rules = Rules {
            spec: &spec,
            parts: &parts,
        };
        // Parts: n, s:amount, hi:amount. Stored: minute 0 (2 events, 10, max 7), minute 3;
        // the guard of partition 0 at offset 10.
        let mut state = State::empty(3);
        state.wm = Some(3 * 60_000);
        state.lo = Some(0);
        state.guards.push(("_o:t:0".into(), 10));
        state.buckets.insert(0, &[2.0, 10.0, 7.0]);
        state.buckets.insert(180_000, &[1.0, 1.0, 1.0]);
        let events = [
            // Applied, minute 4: the 2m window holds minutes 3 and 4, the 5m one 0 to 4.
            event(11, 4 * 60_000 + 5, 5.0),
            // A replay at minute 3: what the hash holds (the first event is after it).
            event(9, 3 * 60_000 + 10_000, 1.0),
            // Too late once the watermark is at minute 4: no windows.
            event(12, 60_000, 2.0),
        ];
        let applied = rules.apply(&mut state, "_o:t:0", &events, None, true);
        assert_eq!(applied.outcomes, b"arl");
        let s = |v: &[f64]| v.iter().map(|x| Some(*x)).collect::<Vec<_>>();
        let mut want = s(&[2.0, 6.0, 5.0, 4.0, 16.0, 7.0]);
        want.extend(s(&[1.0, 1.0, 1.0, 3.0, 11.0, 7.0]));
        want.extend([None; 6]);
        assert_eq!(applied.partials, want);
        assert!(applied.moved && !applied.disagrees);
        assert_eq!(state.wm, Some(4 * 60_000 + 5));
        assert_eq!(state.buckets.get(240_000), Some(&[1.0, 5.0, 5.0][..]));
        assert_eq!(
            state.guard("_o:t:0"),
            Some(12),
            "the late event moves the guard"
        );
        assert_eq!(applied.written, vec![240_000]);
        // Horizon: bucket(4m - 1m) - 5m < 0: nothing deleted; `_lo` stays at minute 0.
        assert!(applied.deleted.is_empty());
        assert_eq!(state.lo, Some(0));
    }

    #[test]
    fn the_horizon_deletes_old_buckets_and_moves_lo() {
        let (spec, parts) = spec_and_parts();
        let rules = Rules {
            spec: &spec,
            parts: &parts,
        };
        let mut state = State::empty(3);
        for m in [0, 2, 4] {
            rules.apply(&mut state, "g", &[event(m, m * 60_000, 1.0)], None, false);
        }
        assert_eq!(state.lo, Some(0));
        // An event at minute 10 and 30 s: horizon bucket(9m30s) - 5m = minute 4.
        let applied = rules.apply(&mut state, "g", &[event(10, 630_000, 1.0)], None, false);
        assert_eq!(applied.deleted, vec![0, 120_000, 240_000]);
        assert_eq!(state.lo, Some(300_000));
        assert_eq!(state.buckets.first(), Some(600_000));
        // Replays only: nothing moves, nothing is written.
        let replay = rules.apply(&mut state, "g", &[event(10, 630_000, 1.0)], None, false);
        assert_eq!((replay.outcomes, replay.moved), (b"r".to_vec(), false));
    }

    #[test]
    fn outcomes_given_by_the_script_are_followed_and_a_difference_is_noticed() {
        let (spec, parts) = spec_and_parts();
        let rules = Rules {
            spec: &spec,
            parts: &parts,
        };
        let mut state = State::empty(3);
        let applied = rules.apply(&mut state, "g", &[event(1, 0, 1.0)], Some(b"r"), false);
        assert!(applied.disagrees);
        assert_eq!(state.buckets.len(), 0, "the given outcome was followed");
    }

    #[test]
    fn a_bucket_is_stored_as_a_json_array_and_read_back_exactly() {
        let partials = [3.0, 2469.12, f64::NAN, 0.1 + 0.2];
        let text = bucket_text(&partials);
        assert_eq!(text, "[3,2469.12,null,0.30000000000000004]");
        let back = parse_bucket(&text).unwrap();
        assert_eq!(back[..2], partials[..2]);
        assert!(back[2].is_nan());
        assert_eq!(back[3].to_bits(), partials[3].to_bits());
        assert_eq!(parse_bucket("[1,x]"), None);
        assert_eq!(parse_bucket("3,4"), None);
    }

    #[test]
    fn snapshots_keep_the_recent_entities_within_their_budget() {
        let snapshot = || {
            let mut state = State::empty(3);
            for m in 0..10 {
                state.buckets.insert(m * 60_000, &[1.0; 3]);
            }
            Snapshot {
                version: "v".into(),
                state,
            }
        };
        let size = 64 + 2 + 1 + snapshot().state.size();
        // Room for about four snapshots: two per generation.
        let mut s = Snapshots::new(4 * size + 8);
        for k in 0..3 {
            s.keep(format!("k{k}"), snapshot());
        }
        // k0 and k1 went old when k2 made the young generation pass half the budget.
        assert!(s.take("k0").is_some(), "an old snapshot is still there");
        for k in 3..6 {
            s.keep(format!("k{k}"), snapshot());
        }
        assert!(s.take("k1").is_none(), "dropped with its generation");
        assert!(s.take("k0").is_none(), "taken out while its write runs");
        assert_eq!(s.take("k5").map(|s| s.version), Some("v".into()));
        let (young, old) = s.held();
        assert!(young + old * size <= 4 * size + 8);
    }
}
