//! Model threads: a bounded queue (admission counted in rows), dynamic batching, and the
//! version in service.
//!
//! The pipeline task splits each micro-batch into jobs of at most `max_batch` rows and waits
//! for admission (a semaphore of `queue_rows` permits); that wait is the backpressure from the
//! model to the source. Each model thread takes a job, then more jobs until `max_batch` rows or
//! `max_delay` (as Triton's dynamic batcher does), runs one forward pass without gradients and
//! answers each job on its own channel. Threads never run on the async workers.
//!
//! A forward pass that raises or returns the wrong shape is retried on halves of the batch
//! until the failing rows are alone, so one bad event fails only itself; a non-finite output
//! fails only its row. A canary's batch with failed rows is scored again by the stable
//! version, so a canary never makes dead letters.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use super::{
    model::LoadedModel,
    versions::{BreakerSpec, Slot, Verdict, Versions},
    InferenceError,
};
use crate::config::ModelSpec;

/// The answer to one job.
#[derive(Debug)]
pub struct JobResult {
    pub version: Arc<str>,
    /// `rows × outputs` values; the rows in `failed` hold zeros.
    pub outputs: Vec<f32>,
    /// Rows of the job (0-based) that could not be scored.
    pub failed: Vec<(usize, InferenceError)>,
    /// Set when the model's circuit breaker found it broken with nothing to go back to: the
    /// job was not scored.
    pub broken: Option<Arc<str>>,
}

struct Job {
    /// The whole submission's matrix; this job is rows `start..start + rows`.
    values: Arc<Vec<f32>>,
    start: usize,
    rows: usize,
    /// The version to score with; one forward pass holds jobs of one slot.
    slot: Slot,
    reply: oneshot::Sender<JobResult>,
}

/// Settings of the model threads.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeSpec {
    pub model: String,
    pub threads: usize,
    pub max_batch: usize,
    pub max_delay: Duration,
    pub queue_rows: usize,
    pub features: usize,
    pub outputs: usize,
    pub breaker: BreakerSpec,
}

impl From<&ModelSpec> for RuntimeSpec {
    fn from(spec: &ModelSpec) -> Self {
        Self {
            model: spec.name.clone(),
            threads: spec.threads,
            max_batch: spec.max_batch,
            max_delay: spec.max_delay,
            queue_rows: spec.queue_rows,
            features: spec.features(),
            outputs: spec.output.width(),
            breaker: spec.breaker,
        }
    }
}

/// The model threads of one model.
pub struct Runtime {
    spec: RuntimeSpec,
    queue: Option<Sender<Job>>,
    admission: Arc<Semaphore>,
    /// Rows queued for the threads and not yet taken.
    queued: Arc<AtomicUsize>,
    pub versions: Arc<Versions>,
    threads: Vec<JoinHandle<()>>,
}

impl Runtime {
    pub fn start(spec: RuntimeSpec, model: LoadedModel) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let versions = Arc::new(Versions::new(&spec.model, spec.breaker, model));
        let admission = Arc::new(Semaphore::new(spec.queue_rows));
        let queued = Arc::new(AtomicUsize::new(0));
        let threads = (0..spec.threads)
            .map(|i| {
                let (rx, versions, spec, queued) =
                    (rx.clone(), versions.clone(), spec.clone(), queued.clone());
                std::thread::Builder::new()
                    .name(format!("model-{}-{i}", spec.model))
                    .spawn(move || worker(&spec, &rx, &versions, &queued))
                    .expect("spawning a model thread")
            })
            .collect();
        Self {
            spec,
            queue: Some(tx),
            admission,
            queued,
            versions,
            threads,
        }
    }

    /// Waits for admission of `admitted` rows (at most `queue_rows`), then queues every row
    /// of `values` (`rows × features`): the first `segments[0].1` rows for the version of
    /// `segments[0].0`, and so on. The permit is the admission: hold it until the rows'
    /// predictions are delivered. The receivers answer in order, one per job of at most
    /// `max_batch` rows.
    pub async fn submit(
        &self,
        values: Arc<Vec<f32>>,
        admitted: usize,
        segments: &[(Slot, usize)],
    ) -> (OwnedSemaphorePermit, Vec<oneshot::Receiver<JobResult>>) {
        let permit = self
            .admission
            .clone()
            .acquire_many_owned(admitted.min(self.spec.queue_rows) as u32)
            .await
            .expect("the admission semaphore is never closed");
        (permit, self.queue(values, segments))
    }

    /// Queues `values` for `slot` only if room for all its rows is free now (the shadow's
    /// rows never wait for, or hold back, the production path's).
    pub fn try_submit(
        &self,
        values: Arc<Vec<f32>>,
        slot: Slot,
    ) -> Option<(OwnedSemaphorePermit, Vec<oneshot::Receiver<JobResult>>)> {
        let rows = values.len() / self.spec.features.max(1);
        let permit = self
            .admission
            .clone()
            .try_acquire_many_owned(rows.min(self.spec.queue_rows) as u32)
            .ok()?;
        Some((permit, self.queue(values, &[(slot, rows)])))
    }

    fn queue(
        &self,
        values: Arc<Vec<f32>>,
        segments: &[(Slot, usize)],
    ) -> Vec<oneshot::Receiver<JobResult>> {
        let rows = values.len() / self.spec.features.max(1);
        debug_assert_eq!(segments.iter().map(|s| s.1).sum::<usize>(), rows);
        let mut replies = Vec::with_capacity(rows.div_ceil(self.spec.max_batch) + 1);
        let mut start = 0;
        for &(slot, len) in segments {
            let end = start + len;
            while start < end {
                let n = self.spec.max_batch.min(end - start);
                let (reply, rx) = oneshot::channel();
                let job = Job {
                    values: values.clone(),
                    start,
                    rows: n,
                    slot,
                    reply,
                };
                self.queued.fetch_add(n, Ordering::Relaxed);
                if let Some(q) = &self.queue {
                    let _ = q.send(job);
                }
                replies.push(rx);
                start += n;
            }
        }
        metrics::gauge!("sluice_model_queue_rows", "model" => self.spec.model.clone())
            .set(self.queued.load(Ordering::Relaxed) as f64);
        replies
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Closing the queue ends the threads once they have answered what they hold.
        self.queue.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(spec: &RuntimeSpec, rx: &Receiver<Job>, versions: &Versions, queued: &AtomicUsize) {
    let labels = [("model", spec.model.clone())];
    let mut carry: Option<Job> = None;
    loop {
        let first = match carry.take() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let mut rows = first.rows;
        let first_slot = first.slot;
        let mut jobs = vec![first];
        let deadline = Instant::now() + spec.max_delay;
        while rows < spec.max_batch {
            let next = match rx.try_recv() {
                Ok(job) => job,
                Err(_) => match rx.recv_deadline(deadline) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                },
            };
            if rows + next.rows > spec.max_batch || next.slot != first_slot {
                carry = Some(next);
                break;
            }
            rows += next.rows;
            jobs.push(next);
        }

        queued.fetch_sub(rows, Ordering::Relaxed);
        metrics::gauge!("sluice_model_queue_rows", &labels)
            .set(queued.load(Ordering::Relaxed) as f64);
        let served = versions.served();
        let mut model = match served.get(first_slot) {
            Some(m) => m.clone(),
            // A canary withdrawn since the rows were routed: the stable version scores them.
            None if first_slot == Slot::Canary => served.stable.clone(),
            None => {
                // A shadow withdrawn: nothing to score with, and nothing waits for it.
                for job in jobs {
                    let _ = job.reply.send(JobResult {
                        version: Arc::from(""),
                        outputs: vec![0.0; job.rows * spec.outputs],
                        failed: (0..job.rows)
                            .map(|r| (r, InferenceError::Raised("the shadow was withdrawn".into())))
                            .collect(),
                        broken: None,
                    });
                }
                continue;
            }
        };
        drop(served);
        let f = spec.features;
        let input: std::borrow::Cow<'_, [f32]> = if jobs.len() == 1 {
            let j = &jobs[0];
            (&j.values[j.start * f..(j.start + j.rows) * f]).into()
        } else {
            jobs.iter()
                .flat_map(|j| &j.values[j.start * f..(j.start + j.rows) * f])
                .copied()
                .collect::<Vec<f32>>()
                .into()
        };
        let started = Instant::now();
        let mut outputs = vec![0f32; rows * spec.outputs];
        let mut failed = Vec::new();
        let mut slot = first_slot;
        let mut broken = versions.broken().filter(|_| slot != Slot::Shadow);
        while broken.is_none() {
            outputs.fill(0.0);
            failed.clear();
            score(
                &model,
                &input,
                rows,
                f,
                spec.outputs,
                0,
                &mut outputs,
                &mut failed,
            );
            match versions.record(&model, slot, rows, failed.len()) {
                // A canary's failures are never dead letters: the stable version scores the
                // batch again (the canary is withdrawn once its breaker window trips).
                Verdict::Serve if slot == Slot::Canary && !failed.is_empty() => {
                    slot = Slot::Stable;
                    model = versions.serving();
                }
                Verdict::Serve => break,
                Verdict::Rescore(previous) => {
                    // A canary's rows go to the stable version, a stable's to the previous.
                    slot = Slot::Stable;
                    model = previous;
                }
                Verdict::Broken(reason) => broken = Some(reason),
            }
        }
        let device = format!("{:?}", model.device).to_lowercase();
        metrics::histogram!("sluice_model_inference_seconds", "model" => spec.model.clone(),
            "device" => device.clone())
        .record(started.elapsed().as_secs_f64());
        metrics::histogram!("sluice_model_batch_rows", &labels).record(rows as f64);
        metrics::counter!("sluice_model_rows_total", "model" => spec.model.clone(),
            "device" => device)
        .increment(rows as u64);
        metrics::counter!("sluice_model_version_rows_total", "model" => spec.model.clone(),
            "version" => model.version.to_string(), "slot" => slot.as_str())
        .increment(rows as u64);
        if !failed.is_empty() {
            debug!(model = %spec.model, failed = failed.len(), rows, "Rows not scored.");
        }

        // Hand each job its rows.
        let mut at = 0;
        let mut failed = failed.into_iter().peekable();
        for job in jobs {
            let mut mine = Vec::new();
            while let Some((row, _)) = failed.peek() {
                if *row >= at + job.rows {
                    break;
                }
                let (row, e) = failed.next().expect("peeked");
                mine.push((row - at, e));
            }
            let result = JobResult {
                version: model.version.clone(),
                outputs: outputs[at * spec.outputs..(at + job.rows) * spec.outputs].to_vec(),
                failed: mine,
                broken: broken.clone(),
            };
            at += job.rows;
            let _ = job.reply.send(result);
        }
    }
}

/// Scores `rows` rows of `x` into `out`, isolating failing rows by bisection; `base` is the
/// index of `x`'s first row in the whole batch (for `failed`).
#[allow(clippy::too_many_arguments)]
fn score(
    model: &LoadedModel,
    x: &[f32],
    rows: usize,
    features: usize,
    outputs: usize,
    base: usize,
    out: &mut [f32],
    failed: &mut Vec<(usize, InferenceError)>,
) {
    match model.forward(x, rows) {
        Ok(values) => {
            for (r, row) in values.chunks_exact(outputs).enumerate() {
                if let Some(v) = row.iter().find(|v| !v.is_finite()) {
                    failed.push((base + r, InferenceError::NonFinite { value: *v }));
                } else {
                    out[r * outputs..(r + 1) * outputs].copy_from_slice(row);
                }
            }
        }
        Err(e) if rows == 1 => failed.push((base, e)),
        Err(e) => {
            debug!(error = %e, rows, "Forward pass failed; retrying on halves.");
            let half = rows / 2;
            let (xa, xb) = x.split_at(half * features);
            let (oa, ob) = out.split_at_mut(half * outputs);
            score(model, xa, half, features, outputs, base, oa, failed);
            score(
                model,
                xb,
                rows - half,
                features,
                outputs,
                base + half,
                ob,
                failed,
            );
        }
    }
}
