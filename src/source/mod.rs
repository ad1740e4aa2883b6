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

pub use self::batch::{
    Batcher, Failure, Originals, RawBatch, Rejected, SourceBatch, Span, TopicPartition,
};
use crate::config::{SourceSpec, StartFrom};

/// What the source tells the pipeline, in the order it happened. The decode stage
/// ([`crate::decode::stage`]) turns each `RawBatch` into a decoded batch `B` on the way.
pub enum SourceEvent<B = RawBatch> {
    Batch(B),
    /// Partitions are about to be assigned. Reply with each partition's resume offset from the
    /// sinks' own records (`None` where they have none).
    Assigned {
        partitions: Vec<TopicPartition>,
        reply: std_mpsc::SyncSender<Vec<(TopicPartition, Option<i64>)>>,
    },
    /// Partitions are being revoked. Finish their data and reply with the offsets to commit.
    Revoked {
        partitions: Vec<TopicPartition>,
        reply: std_mpsc::SyncSender<Vec<(TopicPartition, i64)>>,
    },
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
    /// At least one rebalance has completed: the member has joined its group.
    joined: Arc<AtomicBool>,
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

    fn on_assign(&self, consumer: &KafkaConsumer, tpl: &mut TopicPartitionList) {
        let partitions = partitions_of(tpl);
        info!(pipeline = %self.pipeline, partitions = ?names(&partitions), "Partitions assigned.");
        let resume = self
            .ask(|reply| SourceEvent::Assigned {
                partitions: partitions.clone(),
                reply,
            })
            .unwrap_or_default();
        let committed = consumer
            .committed_offsets(tpl.clone(), Duration::from_secs(30))
            .map_err(
                |error| warn!(%error, "Cannot read committed offsets; using the sinks' positions."),
            )
            .ok();
        for ((topic, partition), from_sinks) in resume {
            let from_commit = committed
                .as_ref()
                .and_then(|c| c.find_partition(&topic, partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            let start = from_commit.into_iter().chain(from_sinks).max();
            if let Some(start) = start {
                debug!(%topic, partition, ?from_commit, ?from_sinks, start, "Resume position.");
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
        info!(pipeline = %self.pipeline, partitions = ?names(&partitions), "Partitions revoked.");
        let commits = self.ask(|reply| SourceEvent::Revoked {
            partitions: partitions.clone(),
            reply,
        });
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
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.on_assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.on_revoke(consumer, tpl),
            other => {
                error!(error = ?other, "Rebalance error; dropping the assignment.");
                let _ = consumer.unassign();
            }
        }
        self.rebalanced.store(true, Ordering::Release);
        self.joined.store(true, Ordering::Release);
    }
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
    for (k, v) in &spec.properties {
        config.set(k, v);
    }
    config
        .set("bootstrap.servers", &spec.bootstrap_servers)
        .set("group.id", &spec.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "auto.offset.reset",
            match spec.start_from {
                StartFrom::Earliest => "earliest",
                StartFrom::Latest => "latest",
            },
        );
    config
}

/// A running source thread.
pub struct Source {
    pub consumer: Arc<KafkaConsumer>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The member has completed its first rebalance.
    pub joined: Arc<AtomicBool>,
}

impl Source {
    /// Creates the consumer, subscribes and starts the poll thread.
    pub fn start(
        pipeline: &str,
        spec: &SourceSpec,
        batcher: Batcher,
        tx: mpsc::Sender<SourceEvent>,
    ) -> Result<Self, KafkaError> {
        let joined = Arc::new(AtomicBool::new(false));
        let context = SourceContext {
            pipeline: pipeline.to_owned(),
            tx,
            shared: Mutex::new(Shared {
                batcher,
                outbox: VecDeque::new(),
                closed: false,
            }),
            rebalanced: AtomicBool::new(false),
            joined: joined.clone(),
        };
        let consumer: KafkaConsumer = consumer_config(spec).create_with_context(context)?;
        let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let consumer = Arc::new(consumer);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("source-{pipeline}"))
            .spawn({
                let consumer = consumer.clone();
                let stop = stop.clone();
                let span = tracing::info_span!("source", pipeline);
                move || span.in_scope(|| poll_loop(&consumer, &stop))
            })
            .expect("spawning a thread");
        Ok(Self {
            consumer,
            stop,
            thread: Some(thread),
            joined,
        })
    }

    /// Stops polling: no more batches are sent. The consumer stays open (for the final commit)
    /// until [`Source::close`].
    pub fn stop_intake(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Waits for the poll thread; the consumer leaves the group when its last handle drops.
    pub fn close(mut self) {
        self.stop_intake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn poll_loop(consumer: &KafkaConsumer, stop: &AtomicBool) {
    let ctx = consumer.context();
    let mut paused = false;
    while !stop.load(Ordering::Acquire) {
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
