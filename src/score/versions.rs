//! The versions of one model: the one in service, the one it replaced, the one refused, and
//! the circuit breaker that goes back from a version failing on real rows.
//!
//! Warm-up only proves that a version works on zeros. The breaker watches what it does with
//! real rows: the model threads count, per version in service, the rows scored and the rows
//! that failed (raised, wrong shape, non-finite). Counts are kept in tumbling windows of
//! `min_rows` rows; a window whose failure share reaches `failure_rate` trips the breaker:
//!
//! - if a previous version is still loaded (the one the last reload replaced), it is put back
//!   in service at once, the failing version is refused until its file changes, and the batch
//!   that tripped the breaker is scored again by the previous version; events of the earlier
//!   batches of that window are already dead letters (`model_error`, …), at most `min_rows`;
//! - if there is none (the version served since start), the model is broken: every later
//!   batch fails the pipeline (exit 1, one `ERROR` line), since dead-lettering every event
//!   would only move the whole stream to the dead-letter topic.
//!
//! The previous version stays loaded until the next reload replaces it, so a reloaded model
//! holds two versions in memory (on its device).

use std::sync::{Arc, Mutex, RwLock};

use tracing::{error, info};

use super::model::{Candidate, LoadedModel};
pub use crate::config::BreakerSpec;

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
    /// The last version refused (by warm-up or by the breaker); not loaded again until it
    /// changes.
    refused: Option<Candidate>,
    window: Window,
    broken: Option<Arc<str>>,
}

/// Shared by the model threads (which read and count) and the reloader (which swaps).
#[derive(Debug)]
pub struct Versions {
    model: String,
    breaker: BreakerSpec,
    /// Read by every batch; written only under `state`'s lock (a swap, a rollback), so that
    /// the hot path takes a read lock only.
    serving: RwLock<Arc<LoadedModel>>,
    state: Mutex<State>,
}

impl Versions {
    pub fn new(model: &str, breaker: BreakerSpec, first: LoadedModel) -> Self {
        let first = Arc::new(first);
        Self {
            model: model.to_owned(),
            breaker,
            serving: RwLock::new(first),
            state: Mutex::new(State {
                previous: None,
                refused: None,
                window: Window::default(),
                broken: None,
            }),
        }
    }

    /// The version in service.
    pub fn serving(&self) -> Arc<LoadedModel> {
        self.serving.read().expect("never poisoned").clone()
    }

    /// Why the model cannot serve, once the breaker found it broken.
    pub fn broken(&self) -> Option<Arc<str>> {
        self.state().broken.clone()
    }

    /// The version refused last, if any.
    pub fn refused(&self) -> Option<Candidate> {
        self.state().refused.clone()
    }

    /// Remembers a candidate that failed to load or warm up.
    pub fn refuse(&self, candidate: Candidate) {
        self.state().refused = Some(candidate);
    }

    /// Puts `model` in service; the one it replaces becomes the previous version.
    pub fn swap(&self, model: LoadedModel) {
        let new = Arc::new(model);
        let mut state = self.state();
        let old = std::mem::replace(
            &mut *self.serving.write().expect("never poisoned"),
            new.clone(),
        );
        set_version_metrics(&self.model, &new, Some(&old));
        info!(model = %self.model, from = %old.version, to = %new.version,
              "Model version swapped in.");
        state.previous = Some(old);
        state.refused = None;
        state.window = Window::default();
        state.broken = None;
    }

    /// Counts a batch of `rows` scored by `model`, `failed` of which failed.
    pub fn record(&self, model: &Arc<LoadedModel>, rows: usize, failed: usize) -> Verdict {
        let mut state = self.state();
        if let Some(reason) = &state.broken {
            return Verdict::Broken(reason.clone());
        }
        let bad = self.serving();
        if !Arc::ptr_eq(model, &bad) {
            // Scored by a version already replaced: it says nothing about the one in service.
            return Verdict::Serve;
        }
        let Some(Window { rows, failed }) = state.window.add(rows, failed, self.breaker) else {
            return Verdict::Serve;
        };
        metrics::counter!("sluice_model_breaker_trips_total", "model" => self.model.clone(),
            "version" => bad.version.to_string())
        .increment(1);
        let share = format!("{failed} of the last {rows} rows");
        match state.previous.take() {
            Some(previous) => {
                error!(model = %self.model, version = %bad.version, back_to = %previous.version,
                       path = %bad.candidate.path.display(),
                       "Model version failed on {share}; circuit breaker tripped: the previous \
                        version serves again and this one is refused until its file changes.");
                set_version_metrics(&self.model, &previous, Some(&bad));
                state.refused = Some(bad.candidate.clone());
                *self.serving.write().expect("never poisoned") = previous.clone();
                metrics::counter!("sluice_model_reloads_total", "model" => self.model.clone(),
                    "result" => "rolled_back")
                .increment(1);
                Verdict::Rescore(previous)
            }
            None => {
                let reason: Arc<str> = Arc::from(format!(
                    "version {} ({}) failed on {share} and there is no earlier version to go \
                     back to; fix the model or publish a working version",
                    bad.version,
                    bad.candidate.path.display()
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

/// `sluice_model_info` (1 for the version in service, 0 for the one it replaced) and
/// `sluice_model_version`.
pub(super) fn set_version_metrics(model: &str, new: &LoadedModel, old: Option<&LoadedModel>) {
    if let Some(old) = old {
        metrics::gauge!("sluice_model_info", "model" => model.to_owned(),
            "version" => old.version.to_string(), "device" => format!("{:?}", old.device))
        .set(0.0);
    }
    metrics::gauge!("sluice_model_info", "model" => model.to_owned(),
        "version" => new.version.to_string(), "device" => format!("{:?}", new.device))
    .set(1.0);
    if let Ok(v) = new.version.parse::<f64>() {
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
