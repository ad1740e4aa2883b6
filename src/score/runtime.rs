//! Model threads: two bounded queues (admission counted in rows), dynamic batching, and the
//! version in service.
//!
//! Two kinds of jobs reach a model: the **stream**'s (each pipeline splits its micro-batches
//! into jobs of at most `max_batch` rows and waits for admission: a semaphore of `queue_rows`
//! permits, the backpressure from the model to the source) and **requests** of the inference
//! API ([`crate::serve`]), admitted at once or refused (a semaphore of `serving.queue_rows`,
//! never waited on: the caller gets 429 / `RESOURCE_EXHAUSTED`). Each model thread takes a
//! job, then more until `max_batch` rows or `max_delay` (as Triton's dynamic batcher does), runs
//! one forward pass without gradients and answers each job on its own channel. Requests go
//! first, up to their share of a pass (`serving.share` of `max_batch`) while stream jobs wait,
//! and the stream's jobs are cut to the rest: so a backlog on the stream never holds a request
//! back by more than one forward pass, and requests never take more than their share of the
//! model from the stream. Threads never run on the async workers.
//!
//! A forward pass that raises or returns the wrong shape is retried on halves of the batch
//! until the failing rows are alone, so one bad event fails only itself; a non-finite output
//! fails only its row. A canary's batch with failed rows is scored again by the stable
//! version, so a canary never makes dead letters. Only the stream's rows count for the
//! circuit breaker: a caller of the API cannot take a version out of service with bad inputs.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use super::{
    model::LoadedModel,
    versions::{BreakerSpec, Served, Slot, Verdict, Versions},
    InferenceError,
};
use crate::config::{ModelSpec, ServingSpec};

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
    /// A request whose deadline passed before a model thread took it: not scored.
    pub expired: bool,
}

/// Which version scores a job.
#[derive(Debug, Clone)]
pub enum Target {
    /// Whatever serves in the slot when a thread takes the job (the stream's jobs).
    Slot(Slot),
    /// This version (a request, pinned when it is admitted, so that every row of it is scored
    /// by the version it reports even if another is swapped in meanwhile).
    Version(Arc<LoadedModel>),
}

struct Job {
    /// The whole submission's matrix; this job is rows `start..start + rows`.
    values: Arc<Vec<f32>>,
    start: usize,
    rows: usize,
    target: Target,
    /// A request's deadline: past it, the job is answered `expired`, unscored.
    deadline: Option<Instant>,
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
    /// How requests of the inference API share the model; `None`: it serves none.
    pub serving: Option<ServingSpec>,
}

impl RuntimeSpec {
    /// The same, for a process that serves the inference API (or not).
    pub fn serving(mut self, spec: &ModelSpec, api: bool) -> Self {
        self.serving = api.then(|| spec.serving.clone());
        self
    }

    /// Rows of a pass reserved for requests while stream jobs wait (at least one; none
    /// without the API).
    fn request_rows(&self) -> usize {
        self.serving.as_ref().map_or(0, |s| {
            ((s.share * self.max_batch as f64).round() as usize).clamp(1, self.max_batch - 1)
        })
    }

    /// Rows of a stream job: what a pass leaves beside the requests' share.
    fn stream_job_rows(&self) -> usize {
        (self.max_batch - self.request_rows()).max(1)
    }

    /// Rows of requests admitted at once.
    fn request_queue_rows(&self) -> usize {
        self.serving.as_ref().map_or(0, |s| s.queue_rows)
    }
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
            serving: None,
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The requests' queue holds as many rows as it may: try again shortly.
    Full,
    /// More rows than the requests' queue can ever hold.
    TooLarge { rows: usize, limit: usize },
}

/// The model threads of one model.
pub struct Runtime {
    spec: RuntimeSpec,
    stream: Option<Sender<Job>>,
    requests: Option<Sender<Job>>,
    admission: Arc<Semaphore>,
    request_admission: Arc<Semaphore>,
    /// Rows queued for the threads and not yet taken.
    queued: Arc<AtomicUsize>,
    pub versions: Arc<Versions>,
    threads: Vec<JoinHandle<()>>,
}

impl Runtime {
    pub fn start(spec: RuntimeSpec, model: LoadedModel) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let (req_tx, req_rx) = crossbeam_channel::unbounded::<Job>();
        let versions = Arc::new(Versions::new(&spec.model, spec.breaker, model));
        let admission = Arc::new(Semaphore::new(spec.queue_rows));
        let request_admission = Arc::new(Semaphore::new(spec.request_queue_rows()));
        let queued = Arc::new(AtomicUsize::new(0));
        let threads = (0..spec.threads)
            .map(|i| {
                let queues = Queues::new(rx.clone(), req_rx.clone());
                let (versions, spec, queued) = (versions.clone(), spec.clone(), queued.clone());
                std::thread::Builder::new()
                    .name(format!("model-{}-{i}", spec.model))
                    .spawn(move || worker(&spec, queues, &versions, &queued))
                    .expect("spawning a model thread")
            })
            .collect();
        Self {
            spec,
            stream: Some(tx),
            requests: Some(req_tx),
            admission,
            request_admission,
            queued,
            versions,
            threads,
        }
    }

    /// Waits for admission of `admitted` rows (at most `queue_rows`), then queues every row
    /// of `values` (`rows × features`): the first `segments[0].1` rows for the version of
    /// `segments[0].0`, and so on. The permit is the admission: hold it until the rows'
    /// predictions are delivered. The receivers answer in order, one per job.
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

    /// A request of the inference API: admitted now or refused, scored by `version`, and
    /// answered `expired` if no thread takes it before `deadline`. The permit is the
    /// admission: hold it until the answers are in.
    pub fn request(
        &self,
        values: Arc<Vec<f32>>,
        version: Arc<LoadedModel>,
        deadline: Instant,
    ) -> Result<(OwnedSemaphorePermit, Vec<oneshot::Receiver<JobResult>>), Refused> {
        let rows = values.len() / self.spec.features.max(1);
        let limit = self.spec.request_queue_rows();
        if rows > limit {
            return Err(Refused::TooLarge { rows, limit });
        }
        let permit = self
            .request_admission
            .clone()
            .try_acquire_many_owned(rows as u32)
            .map_err(|_| Refused::Full)?;
        let mut replies = Vec::with_capacity(rows.div_ceil(self.spec.max_batch));
        let mut start = 0;
        while start < rows {
            let n = self.spec.max_batch.min(rows - start);
            let (reply, rx) = oneshot::channel();
            let job = Job {
                values: values.clone(),
                start,
                rows: n,
                target: Target::Version(version.clone()),
                deadline: Some(deadline),
                reply,
            };
            self.queued.fetch_add(n, Ordering::Relaxed);
            if let Some(q) = &self.requests {
                let _ = q.send(job);
            }
            replies.push(rx);
            start += n;
        }
        Ok((permit, replies))
    }

    /// Rows of requests admitted and not answered yet.
    pub fn requests_in_flight(&self) -> usize {
        self.spec.request_queue_rows() - self.request_admission.available_permits()
    }

    fn queue(
        &self,
        values: Arc<Vec<f32>>,
        segments: &[(Slot, usize)],
    ) -> Vec<oneshot::Receiver<JobResult>> {
        let rows = values.len() / self.spec.features.max(1);
        debug_assert_eq!(segments.iter().map(|s| s.1).sum::<usize>(), rows);
        let size = self.spec.stream_job_rows();
        let mut replies = Vec::with_capacity(rows.div_ceil(size) + 1);
        let mut start = 0;
        for &(slot, len) in segments {
            let end = start + len;
            while start < end {
                let n = size.min(end - start);
                let (reply, rx) = oneshot::channel();
                let job = Job {
                    values: values.clone(),
                    start,
                    rows: n,
                    target: Target::Slot(slot),
                    deadline: None,
                    reply,
                };
                self.queued.fetch_add(n, Ordering::Relaxed);
                if let Some(q) = &self.stream {
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
        // Closing the queues ends the threads once they have answered what they hold.
        self.stream.take();
        self.requests.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A model thread's two queues, and the job of each that it took but could not fit into the
/// pass it was making (the next pass starts with it).
struct Queues {
    stream: Receiver<Job>,
    requests: Receiver<Job>,
    carried_stream: Option<Job>,
    carried_request: Option<Job>,
    /// The last pass began with a request: the next begins with a stream job if one waits,
    /// so that large requests cannot take every pass.
    began_with_request: bool,
}

impl Queues {
    fn new(stream: Receiver<Job>, requests: Receiver<Job>) -> Self {
        Self {
            stream,
            requests,
            carried_stream: None,
            carried_request: None,
            began_with_request: false,
        }
    }

    /// The next request, if one is there now.
    fn request(&mut self) -> Option<Job> {
        self.carried_request
            .take()
            .or_else(|| self.requests.try_recv().ok())
    }

    /// The next stream job, if one is there now.
    fn stream_job(&mut self) -> Option<Job> {
        self.carried_stream
            .take()
            .or_else(|| self.stream.try_recv().ok())
    }

    /// Whether a stream job waits.
    fn stream_waits(&self) -> bool {
        self.carried_stream.is_some() || !self.stream.is_empty()
    }

    /// The first job of a pass: a request first, unless the last pass began with one and a
    /// stream job waits; waits for one as long as it takes. `None` when both queues are
    /// closed and empty.
    fn first(&mut self) -> Option<Job> {
        let job = if self.began_with_request && self.stream_waits() {
            self.stream_job()
        } else {
            self.request().or_else(|| self.stream_job())
        };
        let job = match job {
            Some(job) => job,
            None => self.arrival(None, true, true)?,
        };
        self.began_with_request = job.deadline.is_some();
        Some(job)
    }

    /// The next job to arrive on the queues chosen (`requests`, `stream`), requests first,
    /// until `deadline` (`None`: for ever); `None` at the deadline, or when the queues chosen
    /// are closed and empty. Jobs carried are not arrivals.
    fn arrival(&mut self, deadline: Option<Instant>, requests: bool, stream: bool) -> Option<Job> {
        let mut open = (requests, stream);
        loop {
            let mut select = crossbeam_channel::Select::new();
            let r = open.0.then(|| select.recv(&self.requests));
            let s = open.1.then(|| select.recv(&self.stream));
            if r.is_none() && s.is_none() {
                return None;
            }
            let ready = match deadline {
                Some(d) => select.select_deadline(d).ok()?,
                None => select.select(),
            };
            let from_requests = Some(ready.index()) == r;
            let queue = if from_requests {
                &self.requests
            } else {
                &self.stream
            };
            match ready.recv(queue) {
                Ok(job) => return Some(job),
                Err(_) if from_requests => open.0 = false,
                Err(_) => open.1 = false,
            }
        }
    }

    /// Puts a job that did not fit back, to start the next pass.
    fn carry(&mut self, job: Job) {
        if job.deadline.is_some() {
            debug_assert!(self.carried_request.is_none());
            self.carried_request = Some(job);
        } else {
            debug_assert!(self.carried_stream.is_none());
            self.carried_stream = Some(job);
        }
    }
}

/// The version a job is scored by, as served now; `None` for a shadow withdrawn since.
fn resolve(served: &Served, target: &Target) -> Option<(Arc<LoadedModel>, Slot)> {
    match target {
        Target::Version(m) => Some((m.clone(), Slot::Stable)),
        Target::Slot(slot) => match served.get(*slot) {
            Some(m) => Some((m.clone(), *slot)),
            // A canary withdrawn since the rows were routed: the stable version scores them.
            None if *slot == Slot::Canary => Some((served.stable.clone(), Slot::Stable)),
            None => None,
        },
    }
}

/// Answers a job without scoring it.
fn unscored(job: Job, outputs: usize, expired: bool, reason: &str) {
    let _ = job.reply.send(JobResult {
        version: Arc::from(""),
        outputs: vec![0.0; job.rows * outputs],
        failed: (0..job.rows)
            .map(|r| (r, InferenceError::Raised(reason.to_owned())))
            .collect(),
        broken: None,
        expired,
    });
}

/// A forward pass being made: its version and jobs, requests first.
struct Pass {
    model: Arc<LoadedModel>,
    /// The slot of its stream jobs (for the breaker).
    slot: Slot,
    jobs: Vec<Job>,
    rows: usize,
    request_rows: usize,
    stream_rows: usize,
}

impl Pass {
    fn add(&mut self, job: Job) {
        self.rows += job.rows;
        if job.deadline.is_some() {
            self.request_rows += job.rows;
        } else {
            self.stream_rows += job.rows;
        }
        self.jobs.push(job);
    }
}

/// Makes the next pass: its first job (waited for), then requests (up to their share while
/// stream jobs wait) and stream jobs of the same version, until `max_batch` rows or
/// `max_delay`. `None` when both queues are closed.
fn next_pass(spec: &RuntimeSpec, queues: &mut Queues, versions: &Versions) -> Option<Pass> {
    let now = || Instant::now();
    let first = loop {
        let job = queues.first()?;
        if job.deadline.is_some_and(|d| d <= now()) {
            unscored(job, spec.outputs, true, "the request's deadline passed");
            continue;
        }
        match resolve(&versions.served(), &job.target) {
            Some((model, slot)) => {
                let mut pass = Pass {
                    model,
                    slot,
                    jobs: Vec::new(),
                    rows: 0,
                    request_rows: 0,
                    stream_rows: 0,
                };
                pass.add(job);
                break pass;
            }
            // A shadow withdrawn: nothing to score with, and nothing waits for it.
            None => unscored(job, spec.outputs, false, "the shadow was withdrawn"),
        }
    };
    let mut pass = first;
    let deadline = now() + spec.max_delay;
    let share = spec.request_rows();
    // A queue is done for this pass once its share is used, or once a job of its did not fit
    // (that job, carried, begins the next pass).
    let (mut requests_done, mut stream_done) = (false, false);
    while pass.rows < spec.max_batch {
        let room = spec.max_batch - pass.rows;
        if !requests_done {
            let request_room = if queues.stream_waits() && !stream_done {
                share.saturating_sub(pass.request_rows).min(room)
            } else {
                room
            };
            if request_room == 0 {
                requests_done = true;
            } else if let Some(job) = queues.request() {
                if job.deadline.is_some_and(|d| d <= now()) {
                    unscored(job, spec.outputs, true, "the request's deadline passed");
                } else if fits(&pass, &job, request_room, &versions.served()) {
                    pass.add(job);
                } else {
                    queues.carry(job);
                    requests_done = true;
                }
                continue;
            }
        }
        if !stream_done {
            if let Some(job) = queues.stream_job() {
                if fits(&pass, &job, room, &versions.served()) {
                    if pass.stream_rows == 0 {
                        if let Target::Slot(slot) = job.target {
                            pass.slot = slot;
                        }
                    }
                    pass.add(job);
                } else {
                    queues.carry(job);
                    stream_done = true;
                }
                continue;
            }
        }
        if requests_done && stream_done {
            break;
        }
        // Nothing more is there now: wait for more until the pass's delay runs out.
        match queues.arrival(Some(deadline), !requests_done, !stream_done) {
            Some(job) => queues.carry(job),
            None => break,
        }
    }
    Some(pass)
}

/// Whether `job` can join `pass`: the same version, and room for its rows.
fn fits(pass: &Pass, job: &Job, room: usize, served: &Served) -> bool {
    job.rows <= room
        && resolve(served, &job.target).is_some_and(|(m, _)| Arc::ptr_eq(&m, &pass.model))
}

fn worker(spec: &RuntimeSpec, mut queues: Queues, versions: &Versions, queued: &AtomicUsize) {
    let labels = [("model", spec.model.clone())];
    while let Some(pass) = next_pass(spec, &mut queues, versions) {
        let Pass {
            mut model,
            slot: first_slot,
            jobs,
            rows,
            request_rows,
            stream_rows,
        } = pass;
        queued.fetch_sub(rows, Ordering::Relaxed);
        metrics::gauge!("sluice_model_queue_rows", &labels)
            .set(queued.load(Ordering::Relaxed) as f64);
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
        // The rows of the pass that are the stream's: only those count for the breaker.
        let is_stream: Vec<bool> = jobs
            .iter()
            .flat_map(|j| std::iter::repeat_n(j.deadline.is_none(), j.rows))
            .collect();
        let started = Instant::now();
        let mut outputs = vec![0f32; rows * spec.outputs];
        let mut failed = Vec::new();
        let mut slot = first_slot;
        let mut broken = versions
            .broken()
            .filter(|_| slot != Slot::Shadow && stream_rows > 0);
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
            if stream_rows == 0 {
                break;
            }
            let stream_failed = failed.iter().filter(|(r, _)| is_stream[*r]).count();
            match versions.record(&model, slot, stream_rows, stream_failed) {
                // A canary's failures are never dead letters: the stable version scores the
                // batch again (the canary is withdrawn once its breaker window trips).
                Verdict::Serve if slot == Slot::Canary && stream_failed > 0 => {
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
        for (origin, n) in [("stream", stream_rows), ("request", request_rows)] {
            if n > 0 {
                metrics::counter!("sluice_model_version_rows_total", "model" => spec.model.clone(),
                    "version" => model.version.to_string(), "slot" => slot.as_str(),
                    "origin" => origin)
                .increment(n as u64);
            }
        }
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
                expired: false,
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        config::ServingSpec,
        score::model::{Candidate, Shape, Stamp},
    };

    /// A real TorchScript module, traced here: each row's two features summed.
    fn model(dir: &Path, version: &str) -> LoadedModel {
        let path = dir.join(format!("{version}.pt"));
        let mut sum = |x: &[tch::Tensor]| {
            vec![x[0].sum_dim_intlist(Some(&[1i64][..]), false, tch::Kind::Float)]
        };
        let zeros = tch::Tensor::zeros([2, 2], (tch::Kind::Float, tch::Device::Cpu));
        tch::CModule::create_by_tracing("sum", "forward", &[zeros], &mut sum)
            .unwrap()
            .save(&path)
            .unwrap();
        let candidate = Candidate {
            path,
            version: version.into(),
            stamp: Stamp {
                len: 0,
                modified: None,
            },
        };
        let shape = Shape {
            features: 2,
            outputs: 1,
            max_batch: 8,
        };
        LoadedModel::load(candidate, tch::Device::Cpu, shape).unwrap()
    }

    fn spec() -> RuntimeSpec {
        RuntimeSpec {
            model: "sum".into(),
            threads: 1,
            max_batch: 8,
            max_delay: Duration::from_millis(1),
            queue_rows: 64,
            features: 2,
            outputs: 1,
            breaker: BreakerSpec {
                failure_rate: 0.5,
                min_rows: 16,
            },
            serving: Some(ServingSpec {
                queue_rows: 1024,
                share: 0.25,
                timeout: Duration::from_secs(1),
            }),
        }
    }

    /// A job of `rows` rows; a request (with a deadline `late` or not) or the stream's.
    fn job(rows: usize, request: Option<Instant>) -> (Job, oneshot::Receiver<JobResult>) {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            values: Arc::new(vec![1.0; rows * 2]),
            start: 0,
            rows,
            target: Target::Slot(Slot::Stable),
            deadline: request,
            reply,
        };
        (job, rx)
    }

    #[test]
    fn requests_take_their_share_of_a_pass_and_the_stream_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let versions = Versions::new("sum", spec().breaker, model(dir.path(), "1"));
        let spec = spec();
        assert_eq!((spec.request_rows(), spec.stream_job_rows()), (2, 6));
        let (stream_tx, stream_rx) = crossbeam_channel::unbounded();
        let (request_tx, request_rx) = crossbeam_channel::unbounded();
        let later = Some(Instant::now() + Duration::from_secs(60));
        let mut replies = Vec::new();
        for _ in 0..2 {
            let (j, rx) = job(6, None);
            stream_tx.send(j).unwrap();
            replies.push(rx);
        }
        for _ in 0..3 {
            let (j, rx) = job(1, later);
            request_tx.send(j).unwrap();
            replies.push(rx);
        }
        drop((stream_tx, request_tx));
        let mut queues = Queues::new(stream_rx, request_rx);
        let kinds = |p: &Pass| {
            p.jobs
                .iter()
                .map(|j| if j.deadline.is_some() { 'r' } else { 's' })
                .collect::<String>()
        };
        // Requests first, up to their share while the stream waits; then a stream job.
        let first = next_pass(&spec, &mut queues, &versions).unwrap();
        assert_eq!((kinds(&first), first.rows), ("rrs".into(), 8));
        // That pass began with a request and the stream still waits: this one begins with
        // the stream's, and the last request fills the room left.
        let second = next_pass(&spec, &mut queues, &versions).unwrap();
        assert_eq!((kinds(&second), second.rows), ("sr".into(), 7));
        assert!(next_pass(&spec, &mut queues, &versions).is_none());
    }

    #[test]
    fn an_expired_request_is_answered_without_being_scored() {
        let dir = tempfile::tempdir().unwrap();
        let versions = Versions::new("sum", spec().breaker, model(dir.path(), "1"));
        let (stream_tx, stream_rx) = crossbeam_channel::unbounded();
        let (request_tx, request_rx) = crossbeam_channel::unbounded();
        let (j, mut rx) = job(1, Some(Instant::now() - Duration::from_millis(1)));
        request_tx.send(j).unwrap();
        drop((stream_tx, request_tx));
        let mut queues = Queues::new(stream_rx, request_rx);
        assert!(next_pass(&spec(), &mut queues, &versions).is_none());
        assert!(rx.try_recv().unwrap().expired);
    }

    #[test]
    fn requests_are_scored_by_their_version_and_never_trip_the_breaker() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = Runtime::start(spec(), model(dir.path(), "1"));
        let pinned = Arc::new(model(dir.path(), "2"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        rt.block_on(async {
            // Scored by the version pinned at admission, though another serves the stream.
            let (_permit, replies) = runtime
                .request(Arc::new(vec![1.0, 2.0, 3.0, 4.5]), pinned.clone(), deadline)
                .unwrap();
            let answer = replies.into_iter().next().unwrap().await.unwrap();
            assert_eq!((&*answer.version, answer.outputs), ("2", vec![3.0, 7.5]));
            // Rows that fail (non-finite outputs), many times the breaker's window: a
            // request's failures are its own.
            let inf = Arc::new(vec![f32::INFINITY; 2 * 40]);
            let (_p, replies) = runtime
                .request(inf.clone(), runtime.versions.serving(), deadline)
                .unwrap();
            for r in replies {
                assert!(!r.await.unwrap().failed.is_empty());
            }
            assert!(runtime.versions.broken().is_none());
            // The same rows on the stream trip it (no earlier version to go back to).
            let (_p, replies) = runtime.submit(inf, 40, &[(Slot::Stable, 40)]).await;
            for r in replies {
                r.await.unwrap();
            }
            assert!(runtime.versions.broken().is_some());
        });
        let too_many = Arc::new(vec![0.0; 2 * 2000]);
        assert_eq!(
            runtime.request(too_many, pinned, deadline).err(),
            Some(Refused::TooLarge {
                rows: 2000,
                limit: 1024
            })
        );
    }
}
