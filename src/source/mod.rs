//! The Kafka source: one OS thread per pipeline polls a consumer-group member, copies
//! messages into micro-batches ([`batch`]) and sends them, in order, on a bounded channel.
//!
//! Rebalances ([`rebalance`]) are handled on the same thread, in librdkafka's rebalance
//! callback, and flow through the same channel as the batches, so the pipeline sees them in
//! order: on assignment it recovers each partition's position from its sinks, on revocation it
//! finishes the partitions and returns the offsets to commit. Neither waits for the pipeline
//! longer than a deadline shorter than the rebalance timeout: a late assignment stays paused
//! until the pipeline has recovered it; a late revocation is [`Fence`]d (its open files are
//! discarded, never published).
//!
//! Backpressure: when the channel is full, the thread pauses every assigned partition and keeps
//! polling (serving rebalances and heartbeats within `max.poll.interval.ms`) until the batch is
//! accepted, then resumes; librdkafka refetches from the last delivered offset.

pub mod batch;
mod rebalance;

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rdkafka::{
    config::ClientConfig,
    consumer::{BaseConsumer, CommitMode, Consumer},
    error::KafkaError,
    statistics::Statistics,
    ClientContext, Offset, TopicPartitionList,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

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

/// Where the pipeline commits the offsets it has made durable: the group, through the source's
/// consumer (in the runner's unit tests, a record of the commits).
pub trait Committer: Send + Sync {
    /// Commits synchronously; it blocks, so call it off the async workers.
    fn commit_offsets(&self, offsets: &[(TopicPartition, i64)]) -> Result<(), KafkaError>;
}

impl Committer for KafkaConsumer {
    fn commit_offsets(&self, offsets: &[(TopicPartition, i64)]) -> Result<(), KafkaError> {
        self.commit(&offsets_list(offsets), CommitMode::Sync)
    }
}

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
    /// How long a rebalance waits for the pipeline.
    deadline: Duration,
    /// Partitions assigned while the pipeline was busy: paused until it has recovered them.
    recovering: Mutex<Vec<rebalance::Recovering>>,
    /// `recovering` is not empty (read on every poll without the lock); stale `true` only
    /// costs one look.
    any_recovering: AtomicBool,
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
            deadline: Duration::from_millis(poll_interval / 3),
            recovering: Mutex::new(Vec::new()),
            any_recovering: AtomicBool::new(false),
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
            let wait = if shared.batcher.waits_for_pipeline() {
                batch::TAKEN_POLL
            } else {
                shared
                    .batcher
                    .until_due()
                    .unwrap_or(Duration::from_millis(100))
            };
            // At most 100 ms, so that a shutdown or a full channel is noticed in time however
            // long `max_delay` is.
            (
                blocked,
                wait.clamp(Duration::from_millis(1), Duration::from_millis(100)),
            )
        };
        // With `batch.eager`, an open batch goes as soon as the consumer has nothing more ready
        // and no earlier batch waits for the pipeline task: at moderate load an event is
        // processed at once; while the pipeline is busy, the next batch grows until it takes
        // the last (group commit; meanwhile polls last at most `TAKEN_POLL`, so that it goes
        // then, not at the next fetch), and at full load to its rows, bytes or delay.
        let eager = !blocked
            && ctx
                .shared
                .lock()
                .expect("source state lock")
                .batcher
                .closes_early();
        let rebalanced = ctx.rebalanced.swap(false, Ordering::AcqRel);
        if blocked && (!paused || rebalanced) {
            set_paused(consumer, ctx, true);
            paused = true;
            metrics::counter!("sluice_source_pauses_total", "pipeline" => ctx.pipeline.clone())
                .increment(1);
        } else if !blocked && paused {
            set_paused(consumer, ctx, false);
            paused = false;
        }
        ctx.recovered(consumer, paused);
        let polled = consumer.poll(if blocked {
            Duration::from_millis(50)
        } else if eager {
            Duration::ZERO
        } else {
            wait
        });
        let mut shared = ctx.shared.lock().expect("source state lock");
        let drained = eager && polled.is_none();
        match polled {
            Some(Ok(_)) if leaving.is_some() => {}
            Some(Ok(msg)) => shared.batcher.push(&msg),
            Some(Err(error)) => warn!(%error, "Consume error."),
            None => {}
        }
        let due = shared.batcher.until_due().is_some_and(|d| d.is_zero());
        if shared.batcher.is_full() || due || drained {
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

/// Pauses or resumes every assigned partition, except that partitions still being recovered
/// ([`rebalance`]) stay paused.
fn set_paused(consumer: &KafkaConsumer, ctx: &SourceContext, pause: bool) {
    let Ok(mut assignment) = consumer.assignment() else {
        return;
    };
    if !pause {
        let recovering = ctx.recovering.lock().expect("recovering lock");
        if !recovering.is_empty() {
            let mut rest = TopicPartitionList::new();
            for e in assignment.elements() {
                let tp: TopicPartition = (Arc::from(e.topic()), e.partition());
                if !recovering.iter().any(|r| r.partitions().any(|p| *p == tp)) {
                    rest.add_partition(e.topic(), e.partition());
                }
            }
            assignment = rest;
        }
    }
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
