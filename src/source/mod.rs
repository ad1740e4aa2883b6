//! The Kafka source: one OS thread per pipeline polls a consumer-group member, copies
//! messages into micro-batches ([`batch`]) and sends them, in order, on a bounded channel.
//!
//! Rebalances are handled on the same thread, in librdkafka's rebalance callback, and flow
//! through the same channel as the batches, so the pipeline sees them in order:
//! - **assign**: the pipeline recovers each partition's position from its sinks; the partition
//!   starts at max(committed offset, sinks' resume offset);
//! - **revoke**: the open micro-batch is sent first, then the pipeline finishes the partitions'
//!   files and returns the offsets to commit; the callback commits them synchronously before
//!   the partitions are released, so nothing is written for a partition after it is revoked.
//!   The callback waits for the pipeline at most a **deadline** (a third of
//!   `max.poll.interval.ms`, the rebalance timeout, so that the member rejoins in time); when
//!   it passes, or when the assignment was **lost** (a session timeout: another member may
//!   own the partitions already), the partitions are [`Fence`]d before they are released: the
//!   pipeline then discards their open files instead of publishing them, and commits nothing
//!   for them.
//!
//! Backpressure: when the channel is full, the thread pauses every assigned partition and keeps
//! polling (serving rebalances and heartbeats within `max.poll.interval.ms`) until the batch is
//! accepted, then resumes; librdkafka refetches from the last delivered offset.

pub mod batch;

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rdkafka::{
    config::ClientConfig,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol},
    error::KafkaError,
    statistics::Statistics,
    types::RDKafkaRespErr,
    ClientContext, Offset, TopicPartitionList,
};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

pub use self::batch::Batcher;
use crate::{
    config::{SourceSpec, StartFrom},
    event::{SourceEvent, TopicPartition},
};

/// Partitions released without the pipeline's answer (a revocation past its deadline, a lost
/// assignment): another member may own them already, so nothing of them may be published or
/// committed. The source fences a partition before releasing it; the pipeline checks the
/// fence before it finishes a file or commits, and lifts it when it handles the revocation.
#[derive(Debug, Default)]
pub struct Fence(Mutex<std::collections::HashSet<TopicPartition>>);

impl Fence {
    pub fn fence(&self, partitions: &[TopicPartition]) {
        let mut set = self.0.lock().expect("fence lock");
        set.extend(partitions.iter().cloned());
    }

    pub fn is_fenced(&self, tp: &TopicPartition) -> bool {
        self.0.lock().expect("fence lock").contains(tp)
    }

    /// Lifts the fence of `tp`; true if it was fenced.
    pub fn lift(&self, tp: &TopicPartition) -> bool {
        self.0.lock().expect("fence lock").remove(tp)
    }
}

/// A consumer-group member with sluice's context.
pub type KafkaConsumer = BaseConsumer<SourceContext>;

/// State shared between the poll loop and librdkafka's callbacks, which run on the same
/// thread during `poll`; the lock is never held across `poll`.
struct Shared {
    batcher: Batcher,
    /// Batches and events waiting for room in the channel, oldest first.
    outbox: VecDeque<SourceEvent>,
    /// The pipeline has gone away (shutdown): rebalances no longer wait for it.
    closed: bool,
}

/// librdkafka callbacks: rebalances and statistics.
pub struct SourceContext {
    pipeline: String,
    tx: mpsc::Sender<SourceEvent>,
    shared: Mutex<Shared>,
    /// Set by rebalances, so the poll loop pauses newly assigned partitions if it must.
    rebalanced: AtomicBool,
    /// The member holds an assignment (possibly empty): set on each assignment, cleared when
    /// it is lost or dropped after a rebalance error (`/readyz`).
    joined: Arc<AtomicBool>,
    /// Partitions released without the pipeline's answer.
    fence: Arc<Fence>,
    /// How long a revocation waits for the pipeline.
    revoke_deadline: Duration,
    /// Events wait in the outbox for room in the channel.
    waiting: Arc<AtomicBool>,
    /// Where a partition without any position starts.
    start_from: StartFrom,
    /// Between joining (at start, or after a revocation) and the next assignment.
    joining: AtomicBool,
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if p.partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!("sluice_consumer_lag_messages",
                        "pipeline" => self.pipeline.clone(), "topic" => topic.clone(),
                        "partition" => partition.to_string())
                    .set(p.consumer_lag as f64);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(pipeline = %self.pipeline, %error, reason, "Kafka client error.");
    }
}

impl SourceContext {
    /// Sends every queued event, waiting for room: used inside rebalances, where order matters
    /// more than latency. Returns false if the pipeline is gone.
    fn drain_outbox_blocking(&self, shared: &mut Shared) -> bool {
        if let Some(batch) = shared.batcher.take() {
            shared.outbox.push_back(SourceEvent::Batch(batch));
        }
        while let Some(ev) = shared.outbox.pop_front() {
            if self.tx.blocking_send(ev).is_err() {
                shared.closed = true;
                shared.outbox.clear();
                return false;
            }
        }
        !shared.closed
    }

    /// Asks the pipeline something and waits for the answer; `None` if it is gone.
    fn ask<T>(&self, make: impl FnOnce(std_mpsc::SyncSender<T>) -> SourceEvent) -> Option<T> {
        let mut shared = self.shared.lock().expect("source state lock");
        if !self.drain_outbox_blocking(&mut shared) {
            return None;
        }
        let (reply, answer) = std_mpsc::sync_channel(1);
        if self.tx.blocking_send(make(reply)).is_err() {
            shared.closed = true;
            return None;
        }
        drop(shared);
        answer.recv().ok()
    }

    /// Like [`Self::ask`], but gives up at `deadline`: then the event stays queued, in order,
    /// for the poll loop to deliver later, and `None` is returned.
    fn ask_until<T>(
        &self,
        deadline: Instant,
        make: impl FnOnce(std_mpsc::SyncSender<T>) -> SourceEvent,
    ) -> Option<T> {
        let mut shared = self.shared.lock().expect("source state lock");
        let (reply, answer) = std_mpsc::sync_channel(1);
        queue_in_order(&mut shared, make(reply));
        while let Some(ev) = shared.outbox.pop_front() {
            match send_until(&self.tx, ev, deadline) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    shared.outbox.push_front(ev);
                    return None;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    shared.closed = true;
                    shared.outbox.clear();
                    return None;
                }
            }
        }
        drop(shared);
        answer
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    }

    fn on_assign(&self, consumer: &KafkaConsumer, tpl: &mut TopicPartitionList) {
        let partitions = partitions_of(tpl);
        info!(pipeline = %self.pipeline, partitions = ?names(&partitions), "Partitions assigned.");
        // The committed offsets first: recovery needs them to tell a committed segment (whose
        // files are never deleted) from one that was never committed (rolled back).
        let committed = consumer
            .committed_offsets(tpl.clone(), Duration::from_secs(30))
            .map_err(
                |error| warn!(%error, "Cannot read committed offsets; using the sinks' positions."),
            )
            .ok();
        let committed_of = |topic: &str, partition: i32| {
            committed
                .as_ref()
                .and_then(|c| c.find_partition(topic, partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
        };
        let with_commits = partitions
            .iter()
            .map(|tp| (tp.clone(), committed_of(&tp.0, tp.1)))
            .collect();
        let resume = self
            .ask(|reply| SourceEvent::Assigned {
                partitions: with_commits,
                reply,
            })
            .unwrap_or_default();
        for ((topic, partition), from_sinks) in resume {
            let from_commit = committed_of(&topic, partition);
            let start = from_commit.into_iter().chain(from_sinks).max();
            let Some(start) = start else {
                if let Err(error) =
                    tpl.set_partition_offset(&topic, partition, initial_offset(self.start_from))
                {
                    error!(%error, %topic, partition, "Cannot set the start offset.");
                }
                continue;
            };
            {
                // Review finding A19: the files' own position wins over an earlier committed
                // offset (a crash before the commit, or an operator's reset): say so, since a
                // reset to reprocess does not reprocess what is already in Parquet.
                if let (Some(c), Some(s)) =
                    (from_commit, from_sinks.filter(|s| Some(*s) > from_commit))
                {
                    info!(%topic, partition, committed = c, from_files = s,
                          "Resuming after the committed offset, where the finished files end; \
                           to reprocess, use a new pipeline name or remove its manifests.");
                } else {
                    debug!(%topic, partition, ?from_commit, ?from_sinks, start, "Resume position.");
                }
                if let Err(error) =
                    tpl.set_partition_offset(&topic, partition, Offset::Offset(start))
                {
                    error!(%error, %topic, partition, "Cannot set the start offset.");
                }
            }
        }
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
            _ => consumer.assign(tpl),
        };
        if let Err(error) = result {
            error!(%error, "Assign failed.");
        }
    }

    fn on_revoke(&self, consumer: &KafkaConsumer, tpl: &TopicPartitionList) {
        let partitions = partitions_of(tpl);
        let lost = consumer.assignment_lost();
        info!(pipeline = %self.pipeline, partitions = ?names(&partitions), lost,
              "Partitions revoked.");
        let event = |reply| SourceEvent::Revoked {
            partitions: partitions.clone(),
            reply,
        };
        let commits = if lost {
            // Another member may own them already: publish and commit nothing of them.
            self.fence.fence(&partitions);
            let (reply, _) = std_mpsc::sync_channel(1);
            queue_in_order(
                &mut self.shared.lock().expect("source state lock"),
                event(reply),
            );
            warn!(pipeline = %self.pipeline, partitions = ?names(&partitions),
                  "Assignment lost; their open files will be discarded.");
            None
        } else {
            let deadline = Instant::now() + self.revoke_deadline;
            let answer = self.ask_until(deadline, event);
            let gone = self.shared.lock().expect("source state lock").closed;
            if answer.is_none() {
                // Fence before releasing: the pipeline may still finish files of these
                // partitions while another member takes them over.
                self.fence.fence(&partitions);
            }
            if answer.is_none() && !gone {
                warn!(pipeline = %self.pipeline, partitions = ?names(&partitions),
                      deadline = ?self.revoke_deadline,
                      "The pipeline did not finish the revoked partitions in time; their open \
                       files will be discarded and consumed again by their next owner.");
            }
            answer
        };
        if let Some(commits) = commits.filter(|c| !c.is_empty()) {
            if let Err(error) = consumer.commit(&offsets_list(&commits), CommitMode::Sync) {
                // The files are finished; their manifests keep the position, so the next
                // owner will not duplicate them. Only dead letters may be sent again.
                warn!(%error, "Commit on revoke failed.");
            }
        }
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
            _ => consumer.unassign(),
        };
        if let Err(error) = result {
            error!(%error, "Unassign failed.");
        }
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &KafkaConsumer,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(consumer, tpl);
                self.joined.store(true, Ordering::Release);
                self.joining.store(false, Ordering::Release);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // The member rejoins after the revocation.
                self.joining.store(true, Ordering::Release);
                // A lost assignment (session timed out, fenced) is not membership; a revocation
                // in an ordinary rebalance is followed by an assignment.
                if consumer.assignment_lost() {
                    self.joined.store(false, Ordering::Release);
                }
                self.on_revoke(consumer, tpl);
            }
            other => {
                error!(error = ?other, "Rebalance error; dropping the assignment.");
                self.joined.store(false, Ordering::Release);
                let _ = consumer.unassign();
            }
        }
        self.rebalanced.store(true, Ordering::Release);
    }
}

/// Queues `event` for the pipeline behind the open micro-batch (closed first), so that the
/// pipeline sees everything consumed before it; the poll loop delivers the queue in order.
fn queue_in_order(shared: &mut Shared, event: SourceEvent) {
    if let Some(batch) = shared.batcher.take() {
        shared.outbox.push_back(SourceEvent::Batch(batch));
    }
    shared.outbox.push_back(event);
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (Arc::from(e.topic()), e.partition()))
        .collect()
}

fn names(partitions: &[TopicPartition]) -> Vec<String> {
    partitions.iter().map(|(t, p)| format!("{t}/{p}")).collect()
}

/// A topic-partition list with offsets, for commits.
pub fn offsets_list(offsets: &[(TopicPartition, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .expect("a fresh list accepts any offset");
    }
    tpl
}

/// librdkafka settings: the user's properties, then what sluice needs to keep its guarantees.
pub fn consumer_config(spec: &SourceSpec) -> ClientConfig {
    let mut config = ClientConfig::new();
    let defaults = BTreeMap::from([
        ("statistics.interval.ms", "5000"),
        ("queued.max.messages.kbytes", "32768"),
        ("session.timeout.ms", "10000"),
    ]);
    for (k, v) in defaults {
        config.set(k, v);
    }
    // Named after the group, so that broker logs and quotas tell pipelines apart (several
    // pipelines in one process are several consumers).
    config.set("client.id", format!("sluice-{}", spec.group_id));
    for (k, v) in &spec.properties {
        config.set(k, v);
    }
    config
        .set("bootstrap.servers", &spec.bootstrap_servers)
        .set("group.id", &spec.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // `start_from` is applied in the assignment, to partitions with no position at all;
        // this reset is for an offset that is no longer on the broker mid-stream (retention
        // overtook a paused consumer): resume at the earliest one still there, losing only
        // what is already gone, never jumping to the end (review finding A14).
        .set("auto.offset.reset", "earliest");
    config
}

/// Where a partition with neither a committed offset nor a position in the sinks starts.
fn initial_offset(start_from: StartFrom) -> Offset {
    match start_from {
        StartFrom::Earliest => Offset::Beginning,
        StartFrom::Latest => Offset::End,
    }
}

/// A running source thread.
pub struct Source {
    pub consumer: Arc<KafkaConsumer>,
    /// Partitions released without the pipeline's answer.
    pub fence: Arc<Fence>,
    stop: Arc<AtomicBool>,
    /// Set by [`Source::leave`]: the poll thread unsubscribes and ends once it holds nothing.
    leave: Arc<Leave>,
    thread: Option<JoinHandle<()>>,
    /// Cancelled when the poll thread ends, however it ends (a panic included): a pipeline
    /// whose source is gone must fail, not wait.
    pub exited: tokio_util::sync::CancellationToken,
    /// The source holds events the pipeline has not taken (its channel is full): the
    /// progress watchdog's sign that events wait.
    pub waiting: Arc<AtomicBool>,
}

/// Cancels its token when dropped: at the end of the poll thread, or while it unwinds.
struct ExitGuard(tokio_util::sync::CancellationToken);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Source {
    /// Creates the consumer, subscribes and starts the poll thread.
    pub fn start(
        pipeline: &str,
        spec: &SourceSpec,
        batcher: Batcher,
        tx: mpsc::Sender<SourceEvent>,
        joined: Arc<AtomicBool>,
    ) -> Result<Self, KafkaError> {
        joined.store(false, Ordering::Release);
        let fence = Arc::new(Fence::default());
        let waiting = Arc::new(AtomicBool::new(false));
        let config = consumer_config(spec);
        // A third of the rebalance timeout (librdkafka's default 300 s), so that the member
        // answers the rebalance well within it.
        let poll_interval = config
            .get("max.poll.interval.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(300_000);
        let context = SourceContext {
            pipeline: pipeline.to_owned(),
            tx,
            shared: Mutex::new(Shared {
                batcher,
                outbox: VecDeque::new(),
                closed: false,
            }),
            rebalanced: AtomicBool::new(false),
            joined,
            fence: fence.clone(),
            revoke_deadline: Duration::from_millis(poll_interval / 3),
            waiting: waiting.clone(),
            start_from: spec.start_from,
            joining: AtomicBool::new(true),
        };
        let consumer: KafkaConsumer = config.create_with_context(context)?;
        let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let consumer = Arc::new(consumer);
        let stop = Arc::new(AtomicBool::new(false));
        let leave = Arc::new(Leave::default());
        let exited = tokio_util::sync::CancellationToken::new();
        let thread = std::thread::Builder::new()
            .name(format!("source-{pipeline}"))
            .spawn({
                let consumer = consumer.clone();
                let (stop, leave) = (stop.clone(), leave.clone());
                let guard = ExitGuard(exited.clone());
                let span = tracing::info_span!("source", pipeline);
                move || {
                    let _guard = guard;
                    span.in_scope(|| poll_loop(&consumer, &stop, &leave))
                }
            })
            .expect("spawning a thread");
        Ok(Self {
            consumer,
            fence,
            stop,
            leave,
            thread: Some(thread),
            exited,
            waiting,
        })
    }

    /// Stops polling: no more batches are sent. The consumer stays open (for the final commit)
    /// until [`Source::close`].
    pub fn stop_intake(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Shutdown through the rebalance protocol (review finding A6): the poll thread stops
    /// taking messages and unsubscribes, so every partition is revoked as in any rebalance
    /// (the pipeline finishes and commits them, within the revocation deadline); it ends
    /// ([`Source::exited`]) once the member holds no partition. A member in the middle of
    /// joining first waits for its assignment, at most `join_wait`: leaving a group in the
    /// middle of a join can wedge it on some brokers (tansu 0.6 never assigns anything again).
    pub fn leave(&self, join_wait: Duration) {
        let ms = u64::try_from(join_wait.as_millis()).unwrap_or(u64::MAX - 1);
        self.leave.0.store(ms.min(u64::MAX - 1), Ordering::Release);
    }

    /// Waits for the poll thread; the consumer leaves the group when its last handle drops.
    pub fn close(mut self) {
        self.stop_intake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request to leave the group: how long to wait for a join under way to finish first, in
/// milliseconds; `u64::MAX` until asked (read on every poll, so an atomic, not a lock).
struct Leave(std::sync::atomic::AtomicU64);

impl Default for Leave {
    fn default() -> Self {
        Self(std::sync::atomic::AtomicU64::new(u64::MAX))
    }
}

impl Leave {
    fn join_wait(&self) -> Option<Duration> {
        let ms = self.0.load(Ordering::Acquire);
        (ms != u64::MAX).then(|| Duration::from_millis(ms))
    }
}

fn poll_loop(consumer: &KafkaConsumer, stop: &AtomicBool, leave: &Leave) {
    let ctx = consumer.context();
    let mut paused = false;
    // Since when the pipeline asked to leave; and whether the member has unsubscribed.
    let mut leaving: Option<Instant> = None;
    let mut left = false;
    while !stop.load(Ordering::Acquire) {
        if let (false, Some(join_wait)) = (left, leave.join_wait()) {
            let since = *leaving.get_or_insert_with(|| {
                // What is consumed but not yet sent is consumed again by the partitions' next
                // owner.
                ctx.shared.lock().expect("source state lock").batcher.take();
                Instant::now()
            });
            if !ctx.joining.load(Ordering::Acquire) || since.elapsed() >= join_wait {
                left = true;
                consumer.unsubscribe();
                info!(pipeline = %ctx.pipeline, "Leaving the group.");
            }
        }
        if left && holds_nothing(consumer, ctx) {
            return;
        }
        // Offer queued batches to the pipeline without blocking.
        let (blocked, wait) = {
            let mut shared = ctx.shared.lock().expect("source state lock");
            if shared.closed {
                return;
            }
            // A short wait for room is cheaper than a pause, which makes librdkafka drop its
            // prefetched messages and fetch them again on resume.
            let deadline = Instant::now() + if paused { Duration::ZERO } else { PAUSE_AFTER };
            while let Some(ev) = shared.outbox.pop_front() {
                match send_until(&ctx.tx, ev, deadline) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(ev)) => {
                        shared.outbox.push_front(ev);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            let blocked = !shared.outbox.is_empty();
            ctx.waiting.store(blocked, Ordering::Release);
            let wait = shared
                .batcher
                .until_due()
                .unwrap_or(Duration::from_millis(100));
            (blocked, wait.max(Duration::from_millis(1)))
        };
        let rebalanced = ctx.rebalanced.swap(false, Ordering::AcqRel);
        if blocked && (!paused || rebalanced) {
            set_paused(consumer, true);
            paused = true;
            metrics::counter!("sluice_source_pauses_total", "pipeline" => ctx.pipeline.clone())
                .increment(1);
        } else if !blocked && paused {
            set_paused(consumer, false);
            paused = false;
        }
        let polled = consumer.poll(if blocked {
            Duration::from_millis(50)
        } else {
            wait
        });
        let mut shared = ctx.shared.lock().expect("source state lock");
        match polled {
            Some(Ok(_)) if leaving.is_some() => {}
            Some(Ok(msg)) => shared.batcher.push(&msg),
            Some(Err(error)) => warn!(%error, "Consume error."),
            None => {}
        }
        let due = shared.batcher.until_due().is_some_and(|d| d.is_zero());
        if shared.batcher.is_full() || due {
            if let Some(batch) = shared.batcher.take() {
                shared.outbox.push_back(SourceEvent::Batch(batch));
            }
        }
    }
}

/// The member has released every partition and the pipeline has every event sent to it.
fn holds_nothing(consumer: &KafkaConsumer, ctx: &SourceContext) -> bool {
    let released = consumer.assignment().map_or(true, |a| a.count() == 0);
    released
        && ctx
            .shared
            .lock()
            .expect("source state lock")
            .outbox
            .is_empty()
}

/// How long the source waits for room in the channel before it pauses its partitions.
const PAUSE_AFTER: Duration = Duration::from_millis(250);

/// Tries to send until `deadline`, polling for room every millisecond.
fn send_until(
    tx: &mpsc::Sender<SourceEvent>,
    mut ev: SourceEvent,
    deadline: Instant,
) -> Result<(), mpsc::error::TrySendError<SourceEvent>> {
    loop {
        match tx.try_send(ev) {
            Err(mpsc::error::TrySendError::Full(back)) if Instant::now() < deadline => {
                ev = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            other => return other,
        }
    }
}

fn set_paused(consumer: &KafkaConsumer, pause: bool) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match result {
        Ok(()) => debug!(pause, partitions = assignment.count(), "Backpressure."),
        Err(error) => warn!(%error, pause, "Cannot pause or resume partitions."),
    }
}
