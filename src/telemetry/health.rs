//! What the HTTP endpoints report about each pipeline: written by the pipeline, its source and
//! its watchdog, read by `/healthz` and `/readyz`.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

/// What the HTTP endpoints report about a pipeline.
#[derive(Debug)]
pub struct Status {
    /// The consumer is a member of its group with an assignment (possibly empty): set by the
    /// source on each assignment, cleared when the assignment is lost or dropped after a
    /// rebalance error.
    pub joined: Arc<AtomicBool>,
    /// The pipeline stopped with an error.
    pub failed: AtomicBool,
    /// The Redis sink's writes succeed (true when there is no Redis sink).
    pub redis_healthy: Arc<AtomicBool>,
    /// The progress watchdog found the pipeline stuck: events wait, and for longer than the
    /// stall timeout no batch was taken, nothing acknowledged and nothing committed.
    pub stalled: AtomicBool,
    /// Milliseconds since `started` at the last sign of progress.
    progress: AtomicU64,
    started: Instant,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            joined: Arc::default(),
            failed: AtomicBool::default(),
            redis_healthy: Arc::new(AtomicBool::new(true)),
            stalled: AtomicBool::default(),
            progress: Default::default(),
            started: Instant::now(),
        }
    }
}

impl Status {
    pub fn new() -> Self {
        Self::default()
    }

    /// Why the pipeline is unhealthy (`/healthz` 503), if it is.
    pub fn unhealthy(&self) -> Option<&'static str> {
        if self.failed.load(Ordering::Acquire) {
            Some("a pipeline failed")
        } else if self.stalled.load(Ordering::Acquire) {
            Some("a pipeline is stuck")
        } else {
            None
        }
    }

    /// Ready to serve (`/readyz` 200): a member of its group, Redis writes succeeding, not failed.
    pub fn ready(&self) -> bool {
        self.joined.load(Ordering::Acquire)
            && self.redis_healthy.load(Ordering::Acquire)
            && !self.failed.load(Ordering::Acquire)
    }

    /// Records a sign of progress: a batch taken, an acknowledgement, a commit.
    pub fn progressed(&self) {
        self.progress
            .store(self.started.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// How long since the last sign of progress.
    pub fn since_progress(&self) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.progress.load(Ordering::Acquire)))
    }
}
