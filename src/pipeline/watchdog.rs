//! The progress watchdog: a pipeline that holds waiting events and makes no progress is
//! marked stalled, so that `/healthz` says so.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use tracing::{info, warn};

use crate::telemetry::health::Status;

/// Watches a pipeline from an OS thread (which no blocked task can hold up): when events wait
/// at the source and nothing has progressed for `timeout`, the pipeline is marked stalled
/// (`/healthz` answers 503, so a supervisor restarts the process), with one `ERROR` line;
/// when it moves again, the mark is lifted.
pub(super) fn watch(
    name: String,
    status: Arc<Status>,
    waiting: Arc<AtomicBool>,
    timeout: Duration,
) {
    let spawned = std::thread::Builder::new()
        .name(format!("watchdog-{name}"))
        .spawn(move || loop {
            std::thread::sleep(
                (timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(1)),
            );
            // The source (which holds the other handles on `waiting`) is gone: stop.
            if Arc::strong_count(&waiting) == 1 {
                return;
            }
            let idle = status.since_progress();
            let stuck = waiting.load(Ordering::Acquire) && idle >= timeout;
            if stuck && !status.stalled.swap(true, Ordering::AcqRel) {
                tracing::error!(pipeline = %name, ?idle,
                    "Pipeline stuck: events wait, and nothing was taken, acknowledged or \
                     committed for {idle:?}; /healthz now answers 503.");
                metrics::gauge!("sluice_pipeline_stalled", "pipeline" => name.clone()).set(1.0);
            } else if !stuck && idle < timeout && status.stalled.swap(false, Ordering::AcqRel) {
                info!(pipeline = %name, "Pipeline moves again.");
                metrics::gauge!("sluice_pipeline_stalled", "pipeline" => name.clone()).set(0.0);
            }
        });
    if let Err(error) = spawned {
        warn!(%error, "Cannot start the progress watchdog.");
    }
}
