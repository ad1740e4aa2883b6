//! The pipeline task's event loop: batches in, sinks written in their declared order, dead
//! letters and predictions awaited, segments finished, offsets committed. The order of
//! durability it keeps is in the module docs of [`crate::pipeline`].

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use arrow::record_batch::RecordBatch;
use futures::{future::BoxFuture, stream::FuturesUnordered, StreamExt};
use rdkafka::error::KafkaError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{offsets::Offsets, PipelineError};
use crate::{
    config::ErrorPolicy,
    event::{Rejected, SourceBatch, SourceEvent, TopicPartition},
    score::{Scored, Scorer},
    sink::{
        dead_letter::{DeadLetterError, DeadLetters},
        Roll, Sink, SinkError,
    },
    source::{Committer, Fence},
    telemetry,
    telemetry::health::Status,
};

/// At most this many dead letters (and scored batches) may await acknowledgement before
/// intake waits for them.
const MAX_PENDING: usize = 10_000;
/// At most this many bytes of dead letters (their payloads, which may each be as large as the
/// broker takes) may await acknowledgement before intake waits for them.
const MAX_PENDING_BYTES: usize = 64 << 20;
/// How long a sink write that shutdown cut short may take when it runs once more, so that the
/// other sinks' copy of the batch can still be made durable (see [`Runner::interrupted`]).
const REDO_LIMIT: Duration = Duration::from_millis(if cfg!(test) { 300 } else { 5_000 });

/// Something the broker acknowledged, or could not take.
enum Done {
    DeadLetter(Result<Rejected, DeadLetterError>),
    Scored(Scored),
}

pub(super) struct Runner {
    labels: String,
    policy: ErrorPolicy,
    committer: Arc<dyn Committer>,
    /// Partitions the source released without our answer: never published nor committed.
    fence: Arc<Fence>,
    /// Where progress is recorded for the watchdog.
    status: Arc<Status>,
    /// The sinks of rows, in the order they write.
    sinks: Vec<Box<dyn Sink>>,
    dead_letters: Option<DeadLetters>,
    scorers: Vec<Scorer>,
    /// Dead letters and scored batches awaiting the broker's acknowledgement.
    pending: FuturesUnordered<BoxFuture<'static, Done>>,
    /// Payload bytes of the dead letters in `pending`.
    pending_bytes: usize,
    offsets: Offsets,
    /// Shutting down: revocations are the member leaving the group.
    leaving: bool,
}

impl Runner {
    /// A runner of the pipeline `name`, committing through `committer`, its sinks of rows
    /// written in the order given; see [`Self::with_records`] for the producers of records.
    pub(super) fn new(
        name: &str,
        policy: ErrorPolicy,
        committer: Arc<dyn Committer>,
        fence: Arc<Fence>,
        status: Arc<Status>,
        sinks: Vec<Box<dyn Sink>>,
    ) -> Self {
        Self {
            labels: name.to_owned(),
            policy,
            committer,
            fence,
            status,
            sinks,
            dead_letters: None,
            scorers: Vec::new(),
            pending: FuturesUnordered::new(),
            pending_bytes: 0,
            offsets: Offsets::default(),
            leaving: false,
        }
    }

    /// Where rejected events go, and the models that score the rows.
    pub(super) fn with_records(
        mut self,
        dead_letters: Option<DeadLetters>,
        scorers: Vec<Scorer>,
    ) -> Self {
        self.dead_letters = dead_letters;
        self.scorers = scorers;
        self
    }

    pub(super) async fn run(
        &mut self,
        rx: &mut mpsc::Receiver<SourceEvent<SourceBatch>>,
        shutdown: &CancellationToken,
        source_exited: &CancellationToken,
        tick: Duration,
    ) -> Result<(), PipelineError> {
        let mut ticker = tokio::time::interval(tick.max(Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                Some(done) = self.pending.next(), if !self.pending.is_empty() => self.acked(done)?,
                _ = shutdown.cancelled() => return Ok(()),
                // Only a stopped pipeline stops the source: it ended (a panic) by itself.
                _ = source_exited.cancelled() => {
                    return Err(PipelineError::SourceExited)
                }
                _ = ticker.tick() => {
                    for sink in &mut self.sinks {
                        if let Some(e) = sink.background_failure() {
                            return Err(PipelineError::sink(sink.name())(e));
                        }
                    }
                    self.roll_due().await?;
                    self.commit().await;
                }
                event = rx.recv() => match event {
                    None => return Err(PipelineError::SourceClosed),
                    Some(SourceEvent::Batch(batch)) => {
                        if !self.batch(batch, shutdown).await? {
                            return Ok(());
                        }
                    }
                    Some(SourceEvent::Assigned { partitions, reply }) => {
                        let _ = reply.send(self.assigned(partitions).await?);
                    }
                    Some(SourceEvent::Revoked { partitions, reply }) => {
                        let _ = reply.send(self.revoke(&partitions).await?);
                    }
                }
            }
        }
    }

    /// Shutdown through the rebalance protocol, after [`crate::source::Source::leave`]: the
    /// source's revocation of every partition is answered as in any rebalance (the partitions
    /// finished and committed), until the source thread ends. Batches still queued are
    /// dropped: none of their offsets is committed, so the next owner consumes them again.
    pub(super) async fn leave(
        &mut self,
        rx: &mut mpsc::Receiver<SourceEvent<SourceBatch>>,
        source_exited: &CancellationToken,
    ) -> Result<(), PipelineError> {
        self.leaving = true;
        loop {
            tokio::select! {
                biased;
                Some(done) = self.pending.next(), if !self.pending.is_empty() => self.acked(done)?,
                event = rx.recv() => match event {
                    None => return Ok(()),
                    Some(SourceEvent::Batch(_)) => {}
                    Some(SourceEvent::Assigned { partitions, reply }) => {
                        let _ = reply.send(self.assigned(partitions).await?);
                    }
                    Some(SourceEvent::Revoked { partitions, reply }) => {
                        let _ = reply.send(self.revoke(&partitions).await?);
                    }
                },
                // After the channel: every revocation the thread sent before it ended is in it.
                _ = source_exited.cancelled() => return Ok(()),
            }
        }
    }

    /// Takes on newly assigned partitions (each with its committed offset): returns where each
    /// resumes by the sinks' own records.
    async fn assigned(
        &mut self,
        partitions: Vec<(TopicPartition, Option<i64>)>,
    ) -> Result<Vec<(TopicPartition, Option<i64>)>, PipelineError> {
        let mut resume = Vec::with_capacity(partitions.len());
        for (tp, committed) in partitions {
            self.offsets.assign(tp.clone());
            // The least advanced sink's position: each needs what follows it.
            let mut at: Option<i64> = None;
            for sink in &mut self.sinks {
                let name = sink.name();
                let recovered = sink
                    .recover(&tp, committed)
                    .await
                    .map_err(PipelineError::sink(name))?;
                if let Some(p) = recovered {
                    at = Some(at.map_or(p, |a| a.min(p)));
                }
            }
            self.offsets.resume(&tp, committed, at);
            resume.push((tp, at));
        }
        Ok(resume)
    }

    fn acked(&mut self, done: Done) -> Result<(), PipelineError> {
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
    fn reject(&mut self, r: Rejected) -> Result<(), PipelineError> {
        let tp = (r.topic.clone(), r.partition);
        if !self.owns(&tp) {
            return Ok(());
        }
        match (&self.policy, &self.dead_letters) {
            (ErrorPolicy::Fail, _) => Err(PipelineError::Rejected {
                topic: r.topic.to_string(),
                partition: r.partition,
                offset: r.offset,
                stage: r.error.stage(),
                reason: r.error.to_string(),
            }),
            (ErrorPolicy::DeadLetter { .. }, Some(dlq)) => {
                debug!(topic = %r.topic, partition = r.partition, offset = r.offset,
                       stage = r.error.stage(), reason = r.error.reason(), "Dead letter.");
                self.offsets.hold(&tp, r.offset);
                self.pending_bytes += payload_len(&r);
                // Sent from a task of its own, so that it goes out at once rather than when this
                // task next polls `pending` (review finding A12).
                let sent = tokio::spawn(dlq.send(r));
                self.pending.push(Box::pin(async move {
                    Done::DeadLetter(
                        sent.await
                            .unwrap_or_else(|e| Err(DeadLetterError::Stopped(e.to_string()))),
                    )
                }));
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
        mut batch: SourceBatch,
        shutdown: &CancellationToken,
    ) -> Result<bool, PipelineError> {
        // Taken: the source may close its next batch early (`batch.eager`).
        drop(batch.ticket.take());
        let started = Instant::now();
        // From the batch's first event's consumption until this task takes it: gathering the
        // batch, decoding it, and waiting for the batch before it.
        telemetry::stage(&self.labels, "waiting", batch.consumed_at);
        self.status.progressed();
        let labels = [("pipeline", self.labels.clone())];
        metrics::counter!("sluice_events_consumed_total", &labels).increment(batch.events() as u64);
        metrics::counter!("sluice_events_decoded_total", &labels)
            .increment(batch.rows.num_rows() as u64);
        metrics::counter!("sluice_bytes_consumed_total", &labels)
            .increment(batch.payload_bytes as u64);
        metrics::histogram!("sluice_batch_rows", &labels).record(batch.events() as f64);
        for r in std::mem::take(&mut batch.rejected) {
            self.reject(r)?;
        }
        // Rows of partitions revoked since the batch was made are dropped: their new owner
        // consumes them again from the committed position.
        let rows = if batch.spans.iter().all(|(tp, _)| self.owns(tp)) {
            batch.rows.clone()
        } else {
            let owned: Vec<TopicPartition> = self
                .offsets
                .owned()
                .into_iter()
                .filter(|tp| !self.fence.is_fenced(tp))
                .collect();
            filter_partitions(&batch.rows, &owned)?
        };
        // Every sink takes the batch at once: Parquet encodes it while Redis writes it. The
        // sinks that enrich the rows for the models (Redis aggregates) must be done before the
        // batch is scored; without them, it is scored first. Segments are finished only between
        // batches, so no Parquet file becomes durable with rows Redis has not acknowledged
        // (rule 0 of the module docs); a write cut short by shutdown is settled by
        // [`Self::interrupted`]. The scorers' holds keep the batch's offsets (and the segments
        // that contain them) from becoming a resume position before its predictions are
        // delivered.
        let enrichers = self.sinks.iter().take_while(|s| s.enriches()).count();
        if enrichers == 0 {
            self.score(&rows, Vec::new(), &batch).await?;
        }
        let originals = batch.originals.as_deref();
        // The first sink (Redis) beside the others even when no model reads it.
        let lead = enrichers.max(1).min(self.sinks.len());
        let (head, tail) = self.sinks.split_at_mut(lead);
        let (first, rest) = futures::future::join(
            write_each(head, &rows, originals, shutdown),
            write_each(tail, &rows, originals, shutdown),
        )
        .await;
        let mut written = first?;
        written.extend(rest?);
        if written.iter().any(Option::is_none)
            && !self
                .interrupted(&mut written, &rows, originals, &batch.spans)
                .await?
        {
            return Ok(false);
        }
        for (i, refused) in written.into_iter().enumerate() {
            self.refused(i, &rows, originals, refused.unwrap_or_default())?;
        }
        if enrichers > 0 {
            let enrichment = self.sinks[..enrichers]
                .iter_mut()
                .flat_map(|s| s.enrichment())
                .collect();
            self.score(&rows, enrichment, &batch).await?;
        }
        for (tp, span) in &batch.spans {
            if self.owns(tp) {
                let skipped = self.offsets.processed(tp, *span);
                if skipped > 0 {
                    self.skipped(tp, *span, skipped);
                }
            }
        }
        while self.pending.len() > MAX_PENDING || self.pending_bytes > MAX_PENDING_BYTES {
            if let Some(done) = self.pending.next().await {
                self.acked(done)?;
            }
        }
        metrics::histogram!("sluice_batch_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        // Segments full by size, or with rows waiting for a file of their own, are finished
        // now (again while finishing one leaves rows waiting); the others on the tick.
        let mut rolled = false;
        loop {
            let due: Vec<_> = self
                .due()
                .into_iter()
                .filter(|(_, why)| matches!(why, Roll::Size | Roll::OpenFiles))
                .collect();
            if due.is_empty() {
                break;
            }
            for (tp, why) in due {
                self.roll(&tp, why).await?;
            }
            rolled = true;
        }
        if rolled {
            self.commit().await;
        }
        Ok(true)
    }

    /// Submits the rows, with the enrichment columns, to every model; each scorer holds the
    /// batch's first offset per partition until its predictions are delivered.
    async fn score(
        &mut self,
        rows: &RecordBatch,
        enrichment: Vec<(String, arrow::array::ArrayRef)>,
        batch: &SourceBatch,
    ) -> Result<(), PipelineError> {
        if self.scorers.is_empty() || rows.num_rows() == 0 {
            return Ok(());
        }
        let scored_rows = crate::util::columns::with_columns(rows, enrichment)?;
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
                    scored_rows.clone(),
                    batch.originals.clone(),
                    holds.clone(),
                    batch.consumed_at,
                )
                .await;
            self.pending
                .push(Box::pin(async move { Done::Scored(scored.await) }));
        }
        Ok(())
    }

    /// Settles a batch some of whose sink writes shutdown cut short (`None` in `written`),
    /// while the other sinks may have it already: each such write runs once more, to the end
    /// or for [`REDO_LIMIT`] (the sinks' writes are replay-safe). True if they all succeeded;
    /// otherwise the batch's partitions are fenced, so that no segment holding rows some sink
    /// lacks is published and nothing of them is committed here: their next owner consumes
    /// them again from the committed offset.
    async fn interrupted(
        &mut self,
        written: &mut [Option<Vec<crate::sink::Refusal>>],
        rows: &RecordBatch,
        originals: Option<&crate::event::Originals>,
        spans: &[(TopicPartition, crate::event::Span)],
    ) -> Result<bool, PipelineError> {
        let unbounded = CancellationToken::new();
        // Only partitions still owned: a fence is lifted when its partition is revoked.
        let partitions: Vec<TopicPartition> = spans
            .iter()
            .map(|(tp, _)| tp.clone())
            .filter(|tp| self.owns(tp))
            .collect();
        for (i, slot) in written.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let sink = &mut self.sinks[i];
            match tokio::time::timeout(REDO_LIMIT, sink.write(rows, originals, &unbounded)).await {
                Ok(Ok(refused)) => *slot = Some(refused),
                Ok(Err(SinkError::Cancelled)) | Err(_) => {
                    warn!(sink = sink.name(), partitions = ?partitions,
                          "Shutdown interrupted a write that could not be finished; these \
                           partitions are left uncommitted for their next owner.");
                    self.fence.fence(&partitions);
                    return Ok(false);
                }
                Ok(Err(e)) => return Err(PipelineError::sink(sink.name())(e)),
            }
        }
        Ok(true)
    }

    /// The rows sink `i` refused for good: each becomes a dead letter of its stage (the other
    /// sinks still have it).
    fn refused(
        &mut self,
        i: usize,
        rows: &RecordBatch,
        originals: Option<&crate::event::Originals>,
        refused: Vec<crate::sink::Refusal>,
    ) -> Result<(), PipelineError> {
        let (topics, partitions, offsets) = crate::schema::provenance(rows);
        for r in refused {
            let (t, p, o) = (
                topics.value(r.row),
                partitions.value(r.row),
                offsets.value(r.row),
            );
            match originals.and_then(|x| x.rejected(t, p, o, r.failure)) {
                Some(rejected) => self.reject(rejected)?,
                None => {
                    return Err(PipelineError::OriginalGone {
                        topic: t.to_owned(),
                        partition: p,
                        offset: o,
                        sink: self.sinks[i].name(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Offsets before `span` that the consumer never saw: counted, and logged when more than
    /// one (a single one is a transaction marker; more, compaction, or an offset reset because
    /// retention deleted them before they were consumed: review finding A14).
    fn skipped(&self, tp: &TopicPartition, span: crate::event::Span, skipped: i64) {
        metrics::counter!("sluice_offsets_skipped_total", "pipeline" => self.labels.clone(),
            "topic" => tp.0.to_string())
        .increment(skipped as u64);
        if skipped > 1 {
            warn!(topic = %tp.0, partition = tp.1, from = span.first - skipped, to = span.first,
                  "Offsets never consumed: deleted by retention before sluice read them (the \
                   consumer resumed at the earliest offset left), compacted, or transaction \
                   markers.");
        }
    }

    /// Partitions some sink wants made durable now (each once, with the first reason given).
    fn due(&self) -> Vec<(TopicPartition, Roll)> {
        let mut due: Vec<(TopicPartition, Roll)> = Vec::new();
        for (tp, why) in self.sinks.iter().flat_map(|s| s.due()) {
            if !due.iter().any(|(t, _)| *t == tp) {
                due.push((tp, why));
            }
        }
        due
    }

    /// The first offset of `tp` that some sink has not made durable.
    fn not_durable_from(&self, tp: &TopicPartition) -> Option<i64> {
        self.sinks
            .iter()
            .filter_map(|s| s.not_durable_from(tp))
            .min()
    }

    /// Waits until every dead letter and prediction sent so far is acknowledged.
    async fn flush_pending(&mut self) -> Result<(), PipelineError> {
        while let Some(done) = self.pending.next().await {
            self.acked(done)?;
        }
        Ok(())
    }

    async fn roll(&mut self, tp: &TopicPartition, why: Roll) -> Result<(), PipelineError> {
        // A finished segment is also a resume position, so every dead letter and prediction
        // below its end must be acknowledged first.
        self.flush_pending().await?;
        let fenced = self.fence.is_fenced(tp);
        for sink in &mut self.sinks {
            if fenced {
                // Released without our answer: another member may be writing these offsets.
                let name = sink.name();
                sink.discard(tp).map_err(PipelineError::sink(name))?;
            } else {
                let name = sink.name();
                sink.make_durable(tp, why)
                    .await
                    .map_err(PipelineError::sink(name))?;
            }
        }
        Ok(())
    }

    /// Rolls `tp` until no sink holds anything of it (rows deferred for want of open files go
    /// into a segment of their own, which is then finished too).
    async fn roll_until_done(
        &mut self,
        tp: &TopicPartition,
        why: Roll,
    ) -> Result<(), PipelineError> {
        loop {
            self.roll(tp, why).await?;
            if !self.sinks.iter().any(|s| s.holding().contains(tp)) {
                return Ok(());
            }
        }
    }

    async fn roll_due(&mut self) -> Result<(), PipelineError> {
        for (tp, why) in self.due() {
            self.roll(&tp, why).await?;
        }
        Ok(())
    }

    /// Finishes the partitions' data and returns the offsets to commit before they go.
    async fn revoke(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, i64)>, PipelineError> {
        self.flush_pending().await?;
        let mut commits = Vec::new();
        for tp in partitions {
            // `roll` discards a fenced partition's files; nothing of it is committed.
            let why = if self.leaving {
                Roll::Shutdown
            } else {
                Roll::Revoke
            };
            self.roll_until_done(tp, why).await?;
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
                let open = self.not_durable_from(&tp);
                self.offsets.committable(&tp, open).map(|at| (tp, at))
            })
            .collect();
        if commits.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let (committer, list) = (self.committer.clone(), commits.clone());
        let result = tokio::task::spawn_blocking(move || committer.commit_offsets(&list)).await;
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

    /// Shutdown, after [`Self::leave`]: finish whatever is still held (partitions the source
    /// could not release through the group), wait for dead letters, commit.
    pub(super) async fn drain(&mut self) -> Result<(), PipelineError> {
        self.flush_pending().await?;
        let mut open: Vec<TopicPartition> = self.sinks.iter().flat_map(|s| s.holding()).collect();
        open.sort();
        open.dedup();
        for tp in open {
            self.roll_until_done(&tp, Roll::Shutdown).await?;
        }
        // The final commit is retried within the grace period; if it never succeeds, the exit
        // code says so (the files are safe: their manifests are the resume position).
        let mut backoff =
            crate::failure::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        loop {
            match self.try_commit().await {
                Ok(()) => return Ok(()),
                Err(error) if backoff.attempts() >= 5 => {
                    return Err(PipelineError::FinalCommit(error))
                }
                Err(_) => tokio::time::sleep(backoff.delay()).await,
            }
        }
    }
}

/// Writes the rows to each of `sinks` in turn: per sink, the rows it refused for good, or
/// `None` when shutdown cut its write short.
async fn write_each(
    sinks: &mut [Box<dyn Sink>],
    rows: &RecordBatch,
    originals: Option<&crate::event::Originals>,
    shutdown: &CancellationToken,
) -> Result<Vec<Option<Vec<crate::sink::Refusal>>>, PipelineError> {
    let mut written = Vec::with_capacity(sinks.len());
    for sink in sinks {
        written.push(match sink.write(rows, originals, shutdown).await {
            Ok(refused) => Some(refused),
            Err(SinkError::Cancelled) => None,
            Err(e) => return Err(PipelineError::sink(sink.name())(e)),
        });
    }
    Ok(written)
}

fn payload_len(r: &Rejected) -> usize {
    r.payload.as_ref().map_or(0, Vec::len)
}

/// Keeps only the rows of the given partitions.
fn filter_partitions(
    batch: &arrow::record_batch::RecordBatch,
    owned: &[TopicPartition],
) -> Result<arrow::record_batch::RecordBatch, PipelineError> {
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
