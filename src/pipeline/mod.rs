//! A running pipeline: wiring of source → sinks, and the commit protocol.
//!
//! Tasks and threads of one pipeline:
//! - the **source thread** ([`crate::source`]) polls Kafka and copies micro-batches;
//! - the **decode thread** ([`crate::decode::stage`]) receives them in order through a bounded
//!   channel (the backpressure: when it is full, the source pauses its partitions), decodes
//!   them into Arrow and passes them on through a channel of one batch, so it decodes the next
//!   batch while the pipeline task writes this one;
//! - the **pipeline task** (this module, one tokio task) sends rejected events to the
//!   dead-letter topic, submits the rows to each model ([`crate::score`]; the model threads
//!   and the prediction producer work while the task goes on), writes features to Redis and
//!   rows into the Parquet segments (CPU work runs under `block_in_place`), finishes segments,
//!   and commits offsets;
//! - the **model threads** of each model, behind a queue with admission in rows; each scored
//!   batch's prediction and feedback records are built and delivered in a task of its own.
//!
//! The order in which things become durable, per partition:
//! 0. a batch's features are acknowledged by Redis before its rows enter a Parquet segment;
//! 1. dead letters and predictions are acknowledged by the broker (all pending ones, before
//!    any segment is finished, because a finished segment's manifest is also a resume
//!    position);
//! 2. the segment's files are finished and published ([`crate::sink::parquet`]);
//! 3. the offset is committed: the contiguous watermark of [`offsets::Offsets`].
//!
//! Shutdown: stop intake, finish every open segment, wait for dead letters, commit, then leave
//! the group, all within the grace period; past it, the process exits without committing
//! (nothing is lost: uncommitted data is consumed again and files are recovered).

pub mod offsets;
mod watchdog;

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _};
use futures::{future::BoxFuture, stream::FuturesUnordered, StreamExt};
use rdkafka::{
    consumer::{CommitMode, Consumer},
    error::KafkaError,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use self::offsets::Offsets;
use crate::{
    config::{ErrorPolicy, Pipeline},
    decode::{Decoder, Limits},
    event::{Failure, Rejected, SourceBatch, SourceEvent, TopicPartition},
    score::{Scored, Scorer},
    sink::{
        dead_letter::{DeadLetterError, DeadLetters},
        parquet::{ParquetSink, Roll},
        redis::{RedisSink, RedisSinkError},
    },
    source::{offsets_list, Batcher, Fence, KafkaConsumer, Source},
    telemetry,
    telemetry::health::Status,
};

/// At most this many dead letters (and scored batches) may await acknowledgement before
/// intake waits for them.
const MAX_PENDING: usize = 10_000;
/// At most this many bytes of dead letters (their payloads, which may each be as large as the
/// broker takes) may await acknowledgement before intake waits for them.
const MAX_PENDING_BYTES: usize = 64 << 20;

/// Something the broker acknowledged, or could not take.
enum Done {
    DeadLetter(Result<Rejected, DeadLetterError>),
    Scored(Scored),
}

/// Runs a pipeline until `shutdown` is cancelled or it fails.
pub async fn run(
    spec: Pipeline,
    shutdown: CancellationToken,
    grace: Duration,
    stall_timeout: Duration,
    status: Arc<Status>,
) -> anyhow::Result<()> {
    let span = tracing::info_span!("pipeline", pipeline = %spec.name);
    let result = run_inner(spec, shutdown, grace, stall_timeout, &status)
        .instrument(span)
        .await;
    if result.is_err() {
        status.failed.store(true, Ordering::Release);
    }
    result
}

async fn run_inner(
    spec: Pipeline,
    shutdown: CancellationToken,
    grace: Duration,
    stall_timeout: Duration,
    status: &Arc<Status>,
) -> anyhow::Result<()> {
    let sink = match &spec.parquet {
        Some(pq) => Some(
            ParquetSink::open(&spec.name, pq, spec.schema.clone())
                .with_context(|| format!("opening {}", pq.location))?,
        ),
        None => None,
    };
    let redis = match &spec.redis {
        Some(r) => Some(RedisSink::open(&spec.name, r, status.redis_healthy.clone()).await?),
        None => None,
    };
    let dead_letters = match &spec.errors.policy {
        ErrorPolicy::DeadLetter {
            topic,
            producer_properties,
        } => Some(
            DeadLetters::new(
                &spec.name,
                &spec.source.bootstrap_servers,
                topic,
                producer_properties,
                spec.errors.max_event_size,
            )
            .context("creating the dead-letter producer")?,
        ),
        _ => None,
    };
    if let Some(dlq) = &dead_letters {
        dlq.check_topic().await?;
    }
    if let Some(n) = spec.models.iter().map(|m| m.intra_op_threads).max() {
        tch::set_num_threads(n as i32);
    }
    let mut scorers = Vec::with_capacity(spec.models.len());
    for m in &spec.models {
        scorers.push(Scorer::open(&spec.name, &spec.source.bootstrap_servers, m).await?);
    }
    let decoder = Decoder::new(spec.schema.clone(), Limits::from(&spec.errors));
    let (tx, raw) = mpsc::channel(spec.batch.max_in_flight);
    let source = Source::start(
        &spec.name,
        &spec.source,
        Batcher::new(spec.batch.clone()),
        tx,
        status.joined.clone(),
    )
    .context("creating the Kafka consumer")?;
    // The decode thread ends by itself when the source or this task lets go of its channels.
    let (rx, _decode) =
        // Originals are kept for the stages that may still reject a valid event: the models
        // and Redis.
        crate::decode::stage::spawn(
            &spec.name,
            decoder,
            !scorers.is_empty() || redis.is_some(),
            raw,
            1,
        );
    status.progressed();
    watchdog::watch(
        spec.name.clone(),
        status.clone(),
        source.waiting.clone(),
        stall_timeout,
    );
    let tick = spec.parquet.as_ref().map_or(Duration::from_secs(1), |pq| {
        pq.idle_flush.min(Duration::from_secs(1))
    }) / 2;
    let mut runner = Runner {
        labels: spec.name.clone(),
        policy: spec.errors.policy.clone(),
        consumer: source.consumer.clone(),
        fence: source.fence.clone(),
        status: status.clone(),
        sink,
        redis,
        dead_letters,
        scorers,
        pending: FuturesUnordered::new(),
        pending_bytes: 0,
        offsets: Offsets::default(),
    };
    info!(topics = ?spec.source.topics, group = %spec.source.group_id, "Pipeline started.");
    let result = runner.run(rx, &shutdown, &source.exited, tick).await;
    source.stop_intake();
    let drained = match &result {
        Ok(()) => {
            info!(grace = ?grace, "Shutting down: finishing files and committing.");
            match tokio::time::timeout(grace, runner.drain()).await {
                Ok(r) => r,
                Err(_) => Err(anyhow!(
                    "shutdown took longer than the grace period of {grace:?}; \
                                        uncommitted data will be consumed again"
                )),
            }
        }
        // After a failure nothing more is made durable: restart recovers from the manifests.
        Err(_) => Ok(()),
    };
    drop(runner);
    tokio::task::spawn_blocking(move || source.close())
        .await
        .ok();
    result.and(drained)?;
    info!("Pipeline stopped.");
    Ok(())
}

struct Runner {
    labels: String,
    policy: ErrorPolicy,
    consumer: Arc<KafkaConsumer>,
    /// Partitions the source released without our answer: never published nor committed.
    fence: Arc<Fence>,
    /// Where progress is recorded for the watchdog.
    status: Arc<Status>,
    sink: Option<ParquetSink>,
    redis: Option<RedisSink>,
    dead_letters: Option<DeadLetters>,
    scorers: Vec<Scorer>,
    /// Dead letters and scored batches awaiting the broker's acknowledgement.
    pending: FuturesUnordered<BoxFuture<'static, Done>>,
    /// Payload bytes of the dead letters in `pending`.
    pending_bytes: usize,
    offsets: Offsets,
}

impl Runner {
    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<SourceEvent<SourceBatch>>,
        shutdown: &CancellationToken,
        source_exited: &CancellationToken,
        tick: Duration,
    ) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(tick.max(Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                Some(done) = self.pending.next(), if !self.pending.is_empty() => self.acked(done)?,
                _ = shutdown.cancelled() => return Ok(()),
                // Only a stopped pipeline stops the source: it ended (a panic) by itself.
                _ = source_exited.cancelled() => {
                    return Err(anyhow!("the Kafka source thread stopped unexpectedly"))
                }
                _ = ticker.tick() => {
                    self.roll_due().await?;
                    self.commit().await;
                }
                event = rx.recv() => match event {
                    None => return Err(anyhow!("the Kafka source stopped")),
                    Some(SourceEvent::Batch(batch)) => {
                        if !self.batch(batch, shutdown).await? {
                            return Ok(());
                        }
                    }
                    Some(SourceEvent::Assigned { partitions, reply }) => {
                        let mut resume = Vec::with_capacity(partitions.len());
                        for (tp, committed) in partitions {
                            self.offsets.assign(tp.clone());
                            let at = match &mut self.sink {
                                Some(sink) => sink.recover(&tp, committed).await
                                    .with_context(|| format!("recovering {}/{}", tp.0, tp.1))?,
                                None => None,
                            };
                            resume.push((tp, at));
                        }
                        let _ = reply.send(resume);
                    }
                    Some(SourceEvent::Revoked { partitions, reply }) => {
                        let commits = self.revoke(&partitions).await?;
                        let _ = reply.send(commits);
                    }
                }
            }
        }
    }

    fn acked(&mut self, done: Done) -> anyhow::Result<()> {
        self.status.progressed();
        match done {
            Done::DeadLetter(r) => {
                // A dead letter that cannot be delivered is never dropped: the pipeline fails
                // and nothing at or after its offset is committed.
                let r = r?;
                self.pending_bytes -= payload_len(&r);
                self.offsets
                    .release(&(r.topic.clone(), r.partition), r.offset);
                metrics::counter!("sluice_dead_letters_total", "pipeline" => self.labels.clone(),
                    "stage" => r.error.stage(), "reason" => r.error.reason())
                .increment(1);
            }
            Done::Scored(scored) => {
                if let Some(failure) = scored.failure {
                    return Err(failure.into());
                }
                // The events that were not scored take their own holds before the batch's
                // hold goes.
                for r in scored.rejected {
                    self.reject(r)?;
                }
                for (tp, offset) in &scored.holds {
                    self.offsets.release(tp, *offset);
                }
            }
        }
        Ok(())
    }

    /// This member owns the partition: assigned, and not released behind our back.
    fn owns(&self, tp: &TopicPartition) -> bool {
        self.offsets.owns(tp) && !self.fence.is_fenced(tp)
    }

    /// Applies the error policy to one rejected event.
    fn reject(&mut self, r: Rejected) -> anyhow::Result<()> {
        let tp = (r.topic.clone(), r.partition);
        if !self.owns(&tp) {
            return Ok(());
        }
        match (&self.policy, &self.dead_letters) {
            (ErrorPolicy::Fail, _) => Err(anyhow!(
                "event {}/{}@{} rejected at stage {} ({}) and errors.policy is \"fail\"",
                r.topic,
                r.partition,
                r.offset,
                r.error.stage(),
                r.error
            )),
            (ErrorPolicy::DeadLetter { .. }, Some(dlq)) => {
                debug!(topic = %r.topic, partition = r.partition, offset = r.offset,
                       stage = r.error.stage(), reason = r.error.reason(), "Dead letter.");
                self.offsets.hold(&tp, r.offset);
                self.pending_bytes += payload_len(&r);
                let sent = dlq.send(r);
                self.pending
                    .push(Box::pin(async move { Done::DeadLetter(sent.await) }));
                Ok(())
            }
            _ => {
                metrics::counter!("sluice_events_skipped_total", "pipeline" => self.labels.clone(),
                    "stage" => r.error.stage(), "reason" => r.error.reason())
                .increment(1);
                Ok(())
            }
        }
    }

    /// Handles one micro-batch; false if shutdown interrupted it (its offsets then stay
    /// unprocessed, so nothing of it is committed).
    async fn batch(
        &mut self,
        batch: SourceBatch,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let started = Instant::now();
        self.status.progressed();
        let labels = [("pipeline", self.labels.clone())];
        metrics::counter!("sluice_events_consumed_total", &labels).increment(batch.events() as u64);
        metrics::counter!("sluice_events_decoded_total", &labels)
            .increment(batch.rows.num_rows() as u64);
        metrics::counter!("sluice_bytes_consumed_total", &labels)
            .increment(batch.payload_bytes as u64);
        metrics::histogram!("sluice_batch_rows", &labels).record(batch.events() as f64);
        for r in batch.rejected {
            self.reject(r)?;
        }
        // Rows of partitions revoked since the batch was made are dropped: their new owner
        // consumes them again from the committed position.
        let rows = if batch.spans.iter().all(|(tp, _)| self.owns(tp)) {
            batch.rows
        } else {
            let owned: Vec<TopicPartition> = self
                .offsets
                .owned()
                .into_iter()
                .filter(|tp| !self.fence.is_fenced(tp))
                .collect();
            filter_partitions(&batch.rows, &owned)?
        };
        // Scoring runs beside the writes below; its holds keep the batch's offsets (and the
        // segments that contain them) from becoming a resume position before its predictions
        // are delivered.
        if !self.scorers.is_empty() && rows.num_rows() > 0 {
            let holds: Vec<(TopicPartition, i64)> = batch
                .spans
                .iter()
                .filter(|(tp, _)| self.owns(tp))
                .map(|(tp, span)| (tp.clone(), span.first))
                .collect();
            for scorer in &self.scorers {
                for (tp, offset) in &holds {
                    self.offsets.hold(tp, *offset);
                }
                let scored = scorer
                    .submit(
                        rows.clone(),
                        batch.originals.clone(),
                        holds.clone(),
                        batch.consumed_at,
                    )
                    .await;
                self.pending
                    .push(Box::pin(async move { Done::Scored(scored.await) }));
            }
        }
        // Redis first: a finished Parquet segment is a resume position, so its rows must already
        // be in Redis.
        if let Some(redis) = &mut self.redis {
            let started = Instant::now();
            let refused = match redis.write(&rows, shutdown).await {
                Ok(refused) => refused,
                Err(RedisSinkError::Cancelled) => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            telemetry::stage(&self.labels, "redis", started);
            // Events whose features Redis refused for good become dead letters (stage
            // `redis`); Parquet and the models still have them.
            let (topics, partitions, offsets) = crate::schema::provenance(&rows);
            for r in refused {
                let (t, p, o) = (
                    topics.value(r.row),
                    partitions.value(r.row),
                    offsets.value(r.row),
                );
                let failure = Failure::Redis {
                    reason: r.reason,
                    error: r.error,
                };
                let original = batch
                    .originals
                    .as_ref()
                    .and_then(|x| x.rejected(t, p, o, failure));
                match original {
                    Some(rejected) => self.reject(rejected)?,
                    None => {
                        return Err(anyhow!(
                        "event {t}/{p}@{o} was refused by Redis and its original bytes are gone"
                    ))
                    }
                }
            }
        }
        if let Some(sink) = &mut self.sink {
            let started = Instant::now();
            tokio::task::block_in_place(|| sink.write(&rows))?;
            telemetry::stage(&self.labels, "parquet_write", started);
        }
        for (tp, span) in &batch.spans {
            if self.owns(tp) {
                self.offsets.processed(tp, *span);
            }
        }
        while self.pending.len() > MAX_PENDING || self.pending_bytes > MAX_PENDING_BYTES {
            if let Some(done) = self.pending.next().await {
                self.acked(done)?;
            }
        }
        metrics::histogram!("sluice_batch_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        let due: Vec<_> = self
            .due()
            .into_iter()
            .filter(|(_, why)| matches!(why, Roll::Size))
            .collect();
        if !due.is_empty() {
            for (tp, why) in due {
                self.roll(&tp, why).await?;
            }
            self.commit().await;
        }
        Ok(true)
    }

    fn due(&self) -> Vec<(TopicPartition, Roll)> {
        self.sink.as_ref().map(ParquetSink::due).unwrap_or_default()
    }

    fn open_first(&self, tp: &TopicPartition) -> Option<i64> {
        self.sink.as_ref().and_then(|s| s.open_first(tp))
    }

    /// Waits until every dead letter and prediction sent so far is acknowledged.
    async fn flush_pending(&mut self) -> anyhow::Result<()> {
        while let Some(done) = self.pending.next().await {
            self.acked(done)?;
        }
        Ok(())
    }

    async fn roll(&mut self, tp: &TopicPartition, why: Roll) -> anyhow::Result<()> {
        // A finished segment is also a resume position, so every dead letter and prediction
        // below its end must be acknowledged first.
        self.flush_pending().await?;
        if self.fence.is_fenced(tp) {
            // Released without our answer: another member may be writing these offsets.
            if let Some(sink) = &mut self.sink {
                sink.discard(tp)?;
            }
            return Ok(());
        }
        if let Some(sink) = &mut self.sink {
            sink.finish(tp, why)
                .await
                .with_context(|| format!("finishing the Parquet segment of {}/{}", tp.0, tp.1))?;
        }
        Ok(())
    }

    async fn roll_due(&mut self) -> anyhow::Result<()> {
        for (tp, why) in self.due() {
            self.roll(&tp, why).await?;
        }
        Ok(())
    }

    /// Finishes the partitions' data and returns the offsets to commit before they go.
    async fn revoke(
        &mut self,
        partitions: &[TopicPartition],
    ) -> anyhow::Result<Vec<(TopicPartition, i64)>> {
        self.flush_pending().await?;
        let mut commits = Vec::new();
        for tp in partitions {
            // `roll` discards a fenced partition's files; nothing of it is committed.
            self.roll(tp, Roll::Revoke).await?;
            if !self.fence.lift(tp) {
                if let Some(at) = self.offsets.committable(tp, None) {
                    commits.push((tp.clone(), at));
                }
            }
            self.offsets.revoke(tp);
        }
        Ok(commits)
    }

    /// Commits every partition whose watermark moved. A failed commit is retried on the next
    /// tick; the manifests keep the Parquet position meanwhile.
    async fn commit(&mut self) {
        let _ = self.try_commit().await;
    }

    /// [`Self::commit`], saying whether it failed.
    async fn try_commit(&mut self) -> Result<(), KafkaError> {
        let commits: Vec<(TopicPartition, i64)> = self
            .offsets
            .owned()
            .into_iter()
            .filter(|tp| !self.fence.is_fenced(tp))
            .filter_map(|tp| {
                let open = self.open_first(&tp);
                self.offsets.committable(&tp, open).map(|at| (tp, at))
            })
            .collect();
        if commits.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let consumer = self.consumer.clone();
        let list = offsets_list(&commits);
        let result =
            tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync)).await;
        telemetry::stage(&self.labels, "commit", started);
        match result {
            Ok(Ok(())) => {
                for (tp, at) in &commits {
                    self.offsets.mark_committed(tp, *at);
                }
                self.status.progressed();
                debug!(partitions = commits.len(), "Offsets committed.");
                Ok(())
            }
            Ok(Err(error)) => {
                metrics::counter!("sluice_commit_errors_total", "pipeline" => self.labels.clone())
                    .increment(1);
                warn!(%error, "Commit failed; retrying on the next tick.");
                Err(error)
            }
            Err(error) => panic!("the commit task panicked: {error}"),
        }
    }

    /// Shutdown: finish everything, wait for dead letters, commit.
    async fn drain(&mut self) -> anyhow::Result<()> {
        self.flush_pending().await?;
        let open = self
            .sink
            .as_ref()
            .map(ParquetSink::open_partitions)
            .unwrap_or_default();
        for tp in open {
            self.roll(&tp, Roll::Shutdown).await?;
        }
        // The final commit is retried within the grace period; if it never succeeds, the exit
        // code says so (the files are safe: their manifests are the resume position).
        let mut backoff =
            crate::failure::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        loop {
            match self.try_commit().await {
                Ok(()) => return Ok(()),
                Err(error) if backoff.attempts() >= 5 => {
                    return Err(anyhow!("the final commit failed: {error}"))
                }
                Err(_) => tokio::time::sleep(backoff.delay()).await,
            }
        }
    }
}

fn payload_len(r: &Rejected) -> usize {
    r.payload.as_ref().map_or(0, Vec::len)
}

/// Keeps only the rows of the given partitions.
fn filter_partitions(
    batch: &arrow::record_batch::RecordBatch,
    owned: &[TopicPartition],
) -> anyhow::Result<arrow::record_batch::RecordBatch> {
    use arrow::array::BooleanArray;
    let (topics, partitions, _) = crate::schema::provenance(batch);
    let keep: BooleanArray = (0..batch.num_rows())
        .map(|i| {
            Some(
                owned
                    .iter()
                    .any(|(t, p)| **t == *topics.value(i) && *p == partitions.value(i)),
            )
        })
        .collect();
    Ok(arrow::compute::filter_record_batch(batch, &keep)?)
}
