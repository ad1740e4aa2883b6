//! The versions of one model: the stable one, the canary and the shadow of the repository's
//! rollout ([`super::rollout`]), the one the last swap replaced, the ones refused, and the
//! circuit breaker that goes back from a version failing on real rows.
//!
//! Warm-up only proves that a version works on zeros. The breaker watches what it does with
//! real rows: the model threads count, per version in service, the rows scored and the rows
//! that failed (raised, wrong shape, non-finite). Counts are kept in tumbling windows of
//! `min_rows` rows, one per slot (stable, canary, shadow); a window whose failure share
//! reaches `failure_rate` trips the breaker:
//!
//! - a canary or shadow version is withdrawn at once (in this process) and refused until its
//!   file changes; the canary's batch is scored again by the stable version;
//! - for the stable version, if a previous version is still loaded (the one the last swap
//!   replaced), it is put back in service at once, the failing version is refused until its
//!   file changes, and the batch that tripped the breaker is scored again by the previous
//!   version; events of the earlier batches of that window are already dead letters
//!   (`model_error`, …), at most `min_rows`;
//! - if there is none (the version served since start), the model is broken: every later
//!   batch fails the pipeline (exit 1, one `ERROR` line), since dead-lettering every event
//!   would only move the whole stream to the dead-letter topic.
//!
//! The previous version stays loaded until the next swap replaces it, so a reloaded model
//! holds two versions in memory (on its device), and up to two more with a canary and a
//! shadow.

use std::sync::{Arc, Mutex, RwLock};

use tracing::{error, info};

use super::model::{Candidate, LoadedModel};
pub use crate::config::BreakerSpec;

/// Refused candidates remembered (so that they are not loaded again every reload).
const REFUSED: usize = 8;

/// Which of a model's versions a row is scored by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Stable,
    Canary,
    Shadow,
}

impl Slot {
    pub const ALL: [Slot; 3] = [Slot::Stable, Slot::Canary, Slot::Shadow];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stable => "stable",
            Self::Canary => "canary",
            Self::Shadow => "shadow",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The versions in service.
#[derive(Debug, Clone)]
pub struct Served {
    pub stable: Arc<LoadedModel>,
    /// With the share of entities it serves.
    pub canary: Option<(Arc<LoadedModel>, f64)>,
    pub shadow: Option<Arc<LoadedModel>>,
}

impl Served {
    /// The version of `slot`, if it has one.
    pub fn get(&self, slot: Slot) -> Option<&Arc<LoadedModel>> {
        match slot {
            Slot::Stable => Some(&self.stable),
            Slot::Canary => self.canary.as_ref().map(|(m, _)| m),
            Slot::Shadow => self.shadow.as_ref(),
        }
    }

    /// Every version in service, stable first.
    pub fn all(&self) -> impl Iterator<Item = &Arc<LoadedModel>> {
        Slot::ALL.into_iter().filter_map(|s| self.get(s))
    }

    /// Whether `slot` holds the same loaded version (or none) in both.
    pub fn same_in(&self, other: &Served, slot: Slot) -> bool {
        match (self.get(slot), other.get(slot)) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    /// Whether both serve the same versions with the same canary weight.
    pub fn same_as(&self, other: &Served) -> bool {
        Slot::ALL.into_iter().all(|s| self.same_in(other, s))
            && self.canary.as_ref().map(|c| c.1) == other.canary.as_ref().map(|c| c.1)
    }
}

/// What the model threads should do after a batch.
#[derive(Debug)]
pub enum Verdict {
    /// Go on (with this version or whatever is in service next).
    Serve,
    /// The batch's version was taken out of service; score the batch again with this one.
    Rescore(Arc<LoadedModel>),
    /// The version in service fails and nothing can replace it: fail every batch.
    Broken(Arc<str>),
}

#[derive(Debug, Default, PartialEq)]
struct Window {
    rows: usize,
    failed: usize,
}

impl Window {
    /// Counts a batch; a window that closes with too many failures is returned.
    fn add(&mut self, rows: usize, failed: usize, breaker: BreakerSpec) -> Option<Window> {
        self.rows += rows;
        self.failed += failed;
        if self.rows < breaker.min_rows {
            return None;
        }
        let closed = std::mem::take(self);
        (closed.failed as f64 >= breaker.failure_rate * closed.rows as f64).then_some(closed)
    }
}

#[derive(Debug)]
struct State {
    previous: Option<Arc<LoadedModel>>,
    /// Versions refused (by warm-up or by the breaker), the latest last; not loaded again
    /// until they change.
    refused: Vec<Candidate>,
    windows: [Window; 3],
    broken: Option<Arc<str>>,
}

/// Shared by the model threads (which read and count) and the reloader (which swaps).
#[derive(Debug)]
pub struct Versions {
    model: String,
    breaker: BreakerSpec,
    /// Read by every batch; written only under `state`'s lock (a swap, a rollback), so that
    /// the hot path takes a read lock only.
    served: RwLock<Arc<Served>>,
    state: Mutex<State>,
    /// Told the version a breaker tripped on, so that the repository's rollout refuses it for
    /// every instance.
    on_trip: std::sync::OnceLock<OnTrip>,
}

/// What a breaker's trip is reported to.
pub struct OnTrip(pub Box<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for OnTrip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnTrip")
    }
}

impl Versions {
    pub fn new(model: &str, breaker: BreakerSpec, first: LoadedModel) -> Self {
        Self {
            model: model.to_owned(),
            breaker,
            served: RwLock::new(Arc::new(Served {
                stable: Arc::new(first),
                canary: None,
                shadow: None,
            })),
            state: Mutex::new(State {
                previous: None,
                refused: Vec::new(),
                windows: Default::default(),
                broken: None,
            }),
            on_trip: std::sync::OnceLock::new(),
        }
    }

    /// Reports every breaker trip to `f` (once set, for good).
    pub fn on_trip(&self, f: OnTrip) {
        let _ = self.on_trip.set(f);
    }

    fn tripped(&self, version: &str) {
        if let Some(f) = self.on_trip.get() {
            (f.0)(version);
        }
    }

    /// The stable version.
    pub fn serving(&self) -> Arc<LoadedModel> {
        self.served().stable.clone()
    }

    /// Every version in service.
    pub fn served(&self) -> Arc<Served> {
        self.served.read().expect("never poisoned").clone()
    }

    /// Why the model cannot serve, once the breaker found it broken.
    pub fn broken(&self) -> Option<Arc<str>> {
        self.state().broken.clone()
    }

    /// The versions refused, if any.
    pub fn refused(&self) -> Vec<Candidate> {
        self.state().refused.clone()
    }

    /// Remembers a candidate that failed to load or warm up.
    pub fn refuse(&self, candidate: Candidate) {
        refuse(&mut self.state(), candidate);
    }

    /// A loaded version of `candidate` (in service, or the previous one), to reuse.
    pub fn loaded(&self, candidate: &Candidate) -> Option<Arc<LoadedModel>> {
        let served = self.served();
        let state = self.state();
        let found = served
            .all()
            .chain(state.previous.as_ref())
            .find(|m| m.candidate == *candidate)
            .cloned();
        found
    }

    /// Puts `model` in service as the stable version; the one it replaces becomes the
    /// previous version.
    pub fn swap(&self, model: LoadedModel) {
        let served = self.served();
        self.apply(Served {
            stable: Arc::new(model),
            ..(*served).clone()
        });
    }

    /// Puts `new` in service: a new stable version makes the old one the previous version;
    /// each changed slot starts a new breaker window.
    pub fn apply(&self, new: Served) {
        let mut state = self.state();
        let mut slot = self.served.write().expect("never poisoned");
        let old = std::mem::replace(&mut *slot, Arc::new(new.clone()));
        drop(slot);
        if !Arc::ptr_eq(&old.stable, &new.stable) {
            info!(model = %self.model, from = %old.stable.version, to = %new.stable.version,
                  "Model version swapped in.");
            state.previous = Some(old.stable.clone());
            state.broken = None;
            state.windows[Slot::Stable.index()] = Window::default();
        }
        for s in [Slot::Canary, Slot::Shadow] {
            let (a, b) = (old.get(s), new.get(s));
            if !old.same_in(&new, s) {
                let show = |m: Option<&Arc<LoadedModel>>| {
                    m.map_or_else(|| "none".to_owned(), |m| m.version.to_string())
                };
                info!(model = %self.model, slot = s.as_str(), from = %show(a), to = %show(b),
                      "Model rollout changed.");
                state.windows[s.index()] = Window::default();
            }
        }
        state
            .refused
            .retain(|c| !new.all().any(|m| m.candidate == *c));
        set_version_metrics(&self.model, &new, Some(&old));
    }

    /// Counts a batch of `rows` scored by `model` in `slot`, `failed` of which failed.
    pub fn record(
        &self,
        model: &Arc<LoadedModel>,
        slot: Slot,
        rows: usize,
        failed: usize,
    ) -> Verdict {
        let mut state = self.state();
        if let Some(reason) = &state.broken {
            if slot != Slot::Shadow {
                return Verdict::Broken(reason.clone());
            }
        }
        let served = self.served();
        if !served.get(slot).is_some_and(|m| Arc::ptr_eq(model, m)) {
            // Scored by a version already replaced: it says nothing about the one in service.
            return Verdict::Serve;
        }
        let Some(Window { rows, failed }) =
            state.windows[slot.index()].add(rows, failed, self.breaker)
        else {
            return Verdict::Serve;
        };
        metrics::counter!("sluice_model_breaker_trips_total", "model" => self.model.clone(),
            "version" => model.version.to_string(), "slot" => slot.as_str())
        .increment(1);
        let share = format!("{failed} of the last {rows} rows");
        self.tripped(&model.version);
        if slot != Slot::Stable {
            error!(model = %self.model, version = %model.version, slot = slot.as_str(),
                   path = %model.candidate.path.display(),
                   "Model version failed on {share}; circuit breaker tripped: it is withdrawn \
                    and refused until its file changes.");
            refuse(&mut state, model.candidate.clone());
            let mut next = (*served).clone();
            match slot {
                Slot::Canary => next.canary = None,
                _ => next.shadow = None,
            }
            set_version_metrics(&self.model, &next, Some(&served));
            *self.served.write().expect("never poisoned") = Arc::new(next);
            return match slot {
                Slot::Canary => Verdict::Rescore(served.stable.clone()),
                _ => Verdict::Serve,
            };
        }
        match state.previous.take() {
            Some(previous) => {
                error!(model = %self.model, version = %model.version, back_to = %previous.version,
                       path = %model.candidate.path.display(),
                       "Model version failed on {share}; circuit breaker tripped: the previous \
                        version serves again and this one is refused until its file changes.");
                refuse(&mut state, model.candidate.clone());
                let next = Served {
                    stable: previous.clone(),
                    ..(*served).clone()
                };
                set_version_metrics(&self.model, &next, Some(&served));
                *self.served.write().expect("never poisoned") = Arc::new(next);
                metrics::counter!("sluice_model_reloads_total", "model" => self.model.clone(),
                    "result" => "rolled_back")
                .increment(1);
                Verdict::Rescore(previous)
            }
            None => {
                let reason: Arc<str> = Arc::from(format!(
                    "version {} ({}) failed on {share} and there is no earlier version to go \
                     back to; fix the model or publish a working version",
                    model.version,
                    model.candidate.path.display()
                ));
                state.broken = Some(reason.clone());
                Verdict::Broken(reason)
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("never poisoned")
    }
}

fn refuse(state: &mut State, candidate: Candidate) {
    state.refused.retain(|c| *c != candidate);
    state.refused.push(candidate);
    let excess = state.refused.len().saturating_sub(REFUSED);
    state.refused.drain(..excess);
}

/// `sluice_model_info` (1 for a version in service, 0 for one that left it),
/// `sluice_model_rollout{slot}` (1, or the canary's weight, for the version in each slot; 0
/// when it left the slot) and `sluice_model_version` (the stable one).
pub(super) fn set_version_metrics(model: &str, new: &Served, old: Option<&Served>) {
    let weight = |s: &Served, slot| match slot {
        Slot::Canary => s.canary.as_ref().map_or(0.0, |(_, w)| *w),
        _ => 1.0,
    };
    let info = |m: &LoadedModel, v: f64| {
        metrics::gauge!("sluice_model_info", "model" => model.to_owned(),
            "version" => m.version.to_string(), "device" => format!("{:?}", m.device))
        .set(v);
    };
    for slot in Slot::ALL {
        let gauge = |m: &LoadedModel| {
            metrics::gauge!("sluice_model_rollout", "model" => model.to_owned(),
                "version" => m.version.to_string(), "slot" => slot.as_str())
        };
        if let Some(m) = old.and_then(|o| o.get(slot)) {
            gauge(m).set(0.0);
            info(m, 0.0);
        }
        if let Some(m) = new.get(slot) {
            gauge(m).set(weight(new, slot));
        }
    }
    for m in new.all() {
        info(m, 1.0);
    }
    if let Ok(v) = new.stable.version.parse::<f64>() {
        metrics::gauge!("sluice_model_version", "model" => model.to_owned()).set(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_trip_on_their_share_of_failures_only() {
        let spec = BreakerSpec {
            failure_rate: 0.5,
            min_rows: 100,
        };
        let mut w = Window::default();
        // Failures spread over healthy windows never trip.
        for _ in 0..10 {
            assert_eq!(w.add(64, 31, spec), None);
            assert_eq!(w.add(64, 31, spec), None, "62 of 128");
        }
        // A window that closes at half its rows failed trips, with its counts.
        assert_eq!(w.add(60, 30, spec), None);
        assert_eq!(
            w.add(40, 20, spec),
            Some(Window {
                rows: 100,
                failed: 50
            })
        );
        // And the next window starts empty.
        assert_eq!(w, Window::default());
        // One batch larger than a window decides alone.
        assert!(w.add(256, 255, spec).is_some());
        let all = BreakerSpec {
            failure_rate: 1.0,
            ..spec
        };
        assert_eq!(w.add(256, 255, all), None);
        assert!(w.add(100, 100, all).is_some());
    }
}
