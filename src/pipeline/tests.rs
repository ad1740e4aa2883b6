//! The runner in process, without a broker: a channel stands for the source, a recording
//! [`Committer`] for the group, and a sink that keeps its rows in memory until it is told to
//! make them durable. These pin down the commit protocol's order (review, Part B): nothing is
//! committed past a row some sink has not made durable, a revocation is answered only after
//! the partition is finished, a partition released behind the runner's back is discarded and
//! never committed, and shutdown leaves through the protocol.

use std::{
    collections::BTreeMap,
    ops::Range,
    sync::{mpsc as std_mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use arrow::{
    array::{Int32Array, Int64Array, RecordBatch, StringArray},
    datatypes::{DataType, Field, Schema},
};
use async_trait::async_trait;
use rdkafka::{error::KafkaError, types::RDKafkaErrorCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{runner::Runner, PipelineError};
use crate::{
    config::ErrorPolicy,
    event::{SourceBatch, SourceEvent, Span, TopicPartition},
    sink::{Refusal, Roll, Sink, SinkError},
    source::{Committer, Fence},
    telemetry::health::Status,
};

fn tp(partition: i32) -> TopicPartition {
    (Arc::from("orders"), partition)
}

/// What the sink was asked to do.
#[derive(Debug, Default)]
struct SinkLog {
    /// Offsets written and not durable yet, per partition.
    open: BTreeMap<TopicPartition, Vec<i64>>,
    durable: BTreeMap<TopicPartition, Vec<i64>>,
    rolls: Vec<(TopicPartition, Roll)>,
    discarded: Vec<TopicPartition>,
    /// Partitions it wants made durable on the next tick.
    due: bool,
}

struct MemorySink(Arc<Mutex<SinkLog>>);

#[async_trait]
impl Sink for MemorySink {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn write(
        &mut self,
        rows: &RecordBatch,
        _originals: Option<&crate::event::Originals>,
        _cancel: &CancellationToken,
    ) -> Result<Vec<Refusal>, SinkError> {
        let (topics, partitions, offsets) = crate::schema::provenance(rows);
        let mut log = self.0.lock().unwrap();
        for i in 0..rows.num_rows() {
            let tp = (Arc::from(topics.value(i)), partitions.value(i));
            log.open.entry(tp).or_default().push(offsets.value(i));
        }
        Ok(Vec::new())
    }

    fn not_durable_from(&self, tp: &TopicPartition) -> Option<i64> {
        self.0.lock().unwrap().open.get(tp)?.first().copied()
    }

    fn due(&self) -> Vec<(TopicPartition, Roll)> {
        let log = self.0.lock().unwrap();
        if !log.due {
            return Vec::new();
        }
        log.open.keys().map(|tp| (tp.clone(), Roll::Size)).collect()
    }

    fn holding(&self) -> Vec<TopicPartition> {
        self.0.lock().unwrap().open.keys().cloned().collect()
    }

    async fn make_durable(&mut self, tp: &TopicPartition, why: Roll) -> Result<(), SinkError> {
        let mut log = self.0.lock().unwrap();
        let rows = log.open.remove(tp).unwrap_or_default();
        log.durable.entry(tp.clone()).or_default().extend(rows);
        log.rolls.push((tp.clone(), why));
        Ok(())
    }

    fn discard(&mut self, tp: &TopicPartition) -> Result<(), SinkError> {
        let mut log = self.0.lock().unwrap();
        log.open.remove(tp);
        log.discarded.push(tp.clone());
        Ok(())
    }
}

/// A sink standing for Redis, whose model inputs are read back: a write waits until the gate
/// is open, and ends as cut short (`Cancelled`) if shutdown comes first.
struct GateSink(Arc<std::sync::atomic::AtomicBool>);

#[async_trait]
impl Sink for GateSink {
    fn name(&self) -> &'static str {
        "gate"
    }

    fn enriches(&self) -> bool {
        true
    }

    async fn write(
        &mut self,
        _rows: &RecordBatch,
        _originals: Option<&crate::event::Originals>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Refusal>, SinkError> {
        while !self.0.load(std::sync::atomic::Ordering::Acquire) {
            if cancel.is_cancelled() {
                return Err(SinkError::Cancelled);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Vec::new())
    }
}

/// Every commit asked of the group; refused while `failing`.
#[derive(Default)]
struct Commits {
    made: Mutex<Vec<(TopicPartition, i64)>>,
    failing: std::sync::atomic::AtomicBool,
}

impl Commits {
    fn of(&self, tp: &TopicPartition) -> Vec<i64> {
        let made = self.made.lock().unwrap();
        made.iter()
            .filter(|(t, _)| t == tp)
            .map(|(_, o)| *o)
            .collect()
    }
}

impl Committer for Commits {
    fn commit_offsets(&self, offsets: &[(TopicPartition, i64)]) -> Result<(), KafkaError> {
        if self.failing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::CoordinatorNotAvailable,
            ));
        }
        self.made.lock().unwrap().extend_from_slice(offsets);
        Ok(())
    }
}

/// The runner's task; it hands the runner and its channel back when it ends.
type Task = tokio::task::JoinHandle<(Runner, mpsc::Receiver<SourceEvent<SourceBatch>>)>;

/// A runner with one memory sink, fed through `tx`.
struct Harness {
    tx: mpsc::Sender<SourceEvent<SourceBatch>>,
    rx: Option<mpsc::Receiver<SourceEvent<SourceBatch>>>,
    runner: Option<Runner>,
    sink: Arc<Mutex<SinkLog>>,
    commits: Arc<Commits>,
    fence: Arc<Fence>,
}

impl Harness {
    fn new() -> Self {
        Self::with(Vec::new())
    }

    /// A runner whose sinks are `first`, then the memory sink.
    fn with(first: Vec<Box<dyn Sink>>) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let sink = Arc::new(Mutex::new(SinkLog::default()));
        let commits = Arc::new(Commits::default());
        let fence = Arc::new(Fence::default());
        let runner = Runner::new(
            "test",
            ErrorPolicy::Skip,
            commits.clone(),
            fence.clone(),
            Arc::new(Status::new()),
            first
                .into_iter()
                .chain([Box::new(MemorySink(sink.clone())) as Box<dyn Sink>])
                .collect(),
        );
        Self {
            tx,
            rx: Some(rx),
            runner: Some(runner),
            sink,
            commits,
            fence,
        }
    }

    /// Runs the event loop until `shutdown`, then hands the runner back.
    fn run(&mut self, shutdown: &CancellationToken) -> Task {
        let (mut runner, mut rx) = (self.runner.take().unwrap(), self.rx.take().unwrap());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let never = CancellationToken::new();
            let tick = Duration::from_millis(10);
            runner
                .run(&mut rx, &shutdown, &never, tick)
                .await
                .expect("the runner fails no test here");
            (runner, rx)
        })
    }

    /// A running harness with `partitions` assigned and the batch `first` written.
    async fn running(
        partitions: &[TopicPartition],
        first: &[(TopicPartition, Range<i64>)],
    ) -> (Self, CancellationToken, Task) {
        Self::new().start(partitions, first).await
    }

    /// [`Self::running`], for this harness.
    async fn start(
        mut self,
        partitions: &[TopicPartition],
        first: &[(TopicPartition, Range<i64>)],
    ) -> (Self, CancellationToken, Task) {
        let shutdown = CancellationToken::new();
        let task = self.run(&shutdown);
        self.assign(partitions).await;
        self.send(batch(first)).await;
        for (tp, rows) in first {
            self.written(tp, rows.end as usize).await;
        }
        (self, shutdown, task)
    }

    /// Waits until the sink holds `n` rows of `tp` not yet durable.
    async fn written(&self, tp: &TopicPartition, n: usize) {
        until("the rows are written", || {
            self.sink.lock().unwrap().open.get(tp).map(Vec::len) == Some(n)
        })
        .await;
    }

    async fn assign(&self, partitions: &[TopicPartition]) {
        let (reply, answer) = std_mpsc::sync_channel(1);
        let partitions = partitions.iter().map(|tp| (tp.clone(), None)).collect();
        self.send(SourceEvent::Assigned { partitions, reply }).await;
        answer_of(answer).await;
    }

    /// Shuts the runner down and leaves as the source does, with the batch `queued` (if any)
    /// behind the shutdown: the runner's answer to the revocation of `partitions` (the offsets
    /// to commit), once it has drained.
    async fn leave(
        self,
        shutdown: CancellationToken,
        task: Task,
        queued: &[(TopicPartition, Range<i64>)],
        partitions: &[TopicPartition],
    ) -> Vec<(TopicPartition, i64)> {
        shutdown.cancel();
        let (mut runner, mut rx) = task.await.unwrap();
        if !queued.is_empty() {
            self.send(batch(queued)).await;
        }
        let (reply, answer) = std_mpsc::sync_channel(1);
        let partitions = partitions.to_vec();
        self.send(SourceEvent::Revoked { partitions, reply }).await;
        let leaving = tokio::spawn(async move {
            let exited = CancellationToken::new();
            let result = runner.leave(&mut rx, &exited).await;
            (result, runner)
        });
        let answer = answer_of(answer).await;
        drop(self.tx);
        let (result, mut runner) = leaving.await.unwrap();
        result.unwrap();
        runner.drain().await.unwrap();
        answer
    }

    /// Asks the runner to give the partitions up; its answer is the offsets to commit.
    async fn revoke(&self, partitions: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        let (reply, answer) = std_mpsc::sync_channel(1);
        let partitions = partitions.to_vec();
        self.send(SourceEvent::Revoked { partitions, reply }).await;
        answer_of(answer).await
    }

    async fn send(&self, event: SourceEvent<SourceBatch>) {
        assert!(self.tx.send(event).await.is_ok(), "the runner listens");
    }
}

/// The runner's answer to a rebalance (it replies on a blocking channel, as the source's
/// rebalance callback waits).
async fn answer_of<T: Send + 'static>(answer: std_mpsc::Receiver<T>) -> T {
    tokio::task::spawn_blocking(move || answer.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the runner answers the rebalance")
}

/// A batch of valid rows: `offsets` of each partition.
fn batch(parts: &[(TopicPartition, Range<i64>)]) -> SourceEvent<SourceBatch> {
    let mut topics = Vec::new();
    let mut partitions = Vec::new();
    let mut offsets = Vec::new();
    for (tp, range) in parts {
        for o in range.clone() {
            topics.push(tp.0.to_string());
            partitions.push(tp.1);
            offsets.push(o);
        }
    }
    let schema = Schema::new(vec![
        Field::new("_topic", DataType::Utf8, false),
        Field::new("_partition", DataType::Int32, false),
        Field::new("_offset", DataType::Int64, false),
    ]);
    let rows = RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(StringArray::from(topics)),
            Arc::new(Int32Array::from(partitions)),
            Arc::new(Int64Array::from(offsets)),
        ],
    )
    .unwrap();
    let spans = parts
        .iter()
        .map(|(tp, r)| {
            let span = Span {
                first: r.start,
                next: r.end,
            };
            (tp.clone(), span)
        })
        .collect();
    SourceEvent::Batch(SourceBatch {
        rows,
        rejected: Vec::new(),
        spans,
        payload_bytes: 0,
        originals: None,
        consumed_at: Instant::now(),
        ticket: None,
    })
}

/// Waits (up to 10 s) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(10), "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_committed_past_a_row_a_sink_has_not_made_durable() {
    let (h, shutdown, task) = Harness::running(&[tp(0)], &[(tp(0), 0..10)]).await;
    // Several ticks, each of which commits what it may.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        h.commits.of(&tp(0)).iter().all(|o| *o == 0),
        "committed past the open rows: {:?}",
        h.commits.of(&tp(0))
    );
    h.sink.lock().unwrap().due = true;
    until("the end is committed once the rows are durable", || {
        h.commits.of(&tp(0)).last() == Some(&10)
    })
    .await;
    assert_eq!(h.sink.lock().unwrap().rolls, [(tp(0), Roll::Size)]);
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_is_answered_once_the_partition_is_durable() {
    let (h, shutdown, task) =
        Harness::running(&[tp(0), tp(1)], &[(tp(0), 0..10), (tp(1), 0..4)]).await;
    let commits = h.revoke(&[tp(0)]).await;
    assert_eq!(commits, [(tp(0), 10)], "the revoked partition's end");
    {
        let log = h.sink.lock().unwrap();
        assert_eq!(log.durable[&tp(0)], (0..10).collect::<Vec<_>>());
        assert_eq!(log.rolls, [(tp(0), Roll::Revoke)]);
        assert_eq!(
            log.open[&tp(1)].len(),
            4,
            "the other partition is untouched"
        );
    }
    // Rows of a partition the member no longer owns are not written (its next owner has them).
    h.send(batch(&[(tp(0), 10..12), (tp(1), 4..6)])).await;
    h.written(&tp(1), 6).await;
    assert!(!h.sink.lock().unwrap().open.contains_key(&tp(0)));
    shutdown.cancel();
    task.await.unwrap();
}

/// Review finding A5: a partition the source released without the runner's answer (the
/// revocation's deadline passed, or the assignment was lost) may already be another member's.
/// Its open rows are discarded, never made durable, and it is never committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_released_behind_the_runners_back_is_discarded_and_never_committed() {
    let (h, shutdown, task) = Harness::running(&[tp(0), tp(1)], &[(tp(0), 0..10)]).await;
    h.fence.fence(&[tp(0)]);
    // A batch made before the release: only the partition still owned is written.
    h.send(batch(&[(tp(0), 10..20), (tp(1), 0..5)])).await;
    let commits = h.revoke(&[tp(0)]).await;
    assert_eq!(commits, [], "nothing of a released partition is committed");
    {
        let log = h.sink.lock().unwrap();
        assert_eq!(log.discarded, [tp(0)]);
        assert!(!log.durable.contains_key(&tp(0)), "{:?}", log.durable);
        assert_eq!(log.open[&tp(1)], (0..5).collect::<Vec<_>>());
    }
    assert!(h.commits.of(&tp(0)).iter().all(|o| *o == 0));
    shutdown.cancel();
    task.await.unwrap();
}

/// Review finding A6: at shutdown the runner answers the source's revocation as in any
/// rebalance (the partition finished, its end returned for the commit), and drops the batches
/// still queued: none of their offsets is committed, so the next owner consumes them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_answers_the_revocation_and_drops_queued_batches() {
    let (h, shutdown, task) = Harness::running(&[tp(0)], &[(tp(0), 0..10)]).await;
    let sink = h.sink.clone();
    // Queued behind the shutdown: a batch, then the source's revocation as it leaves.
    let answer = h.leave(shutdown, task, &[(tp(0), 10..20)], &[tp(0)]).await;
    assert_eq!(answer, [(tp(0), 10)]);
    let log = sink.lock().unwrap();
    assert_eq!(log.durable[&tp(0)], (0..10).collect::<Vec<_>>());
    assert_eq!(log.rolls, [(tp(0), Roll::Shutdown)]);
    assert!(log.open.is_empty(), "the queued batch was dropped");
}

/// Review finding A13: a final commit that keeps failing is the drain's error (the process
/// exits non-zero), not a clean shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_commit_that_keeps_failing_fails_the_shutdown() {
    let (h, shutdown, task) = Harness::running(&[tp(0)], &[(tp(0), 0..10)]).await;
    h.commits
        .failing
        .store(true, std::sync::atomic::Ordering::Release);
    shutdown.cancel();
    let (mut runner, _rx) = task.await.unwrap();
    let result = runner.drain().await;
    assert!(
        matches!(result, Err(PipelineError::FinalCommit(_))),
        "{result:?}"
    );
    assert_eq!(
        h.sink.lock().unwrap().rolls,
        [(tp(0), Roll::Shutdown)],
        "the files are finished all the same"
    );
}

/// The sinks take a batch at once: Parquet (here the memory sink) has the rows while Redis (the
/// gate) still writes them. When shutdown cuts the Redis write short, it runs once more; once
/// it succeeds, the batch is finished and committed like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_short_by_shutdown_runs_once_more_before_the_batch_is_committed() {
    let gate = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = Harness::with(vec![Box::new(GateSink(gate.clone()))]);
    // The memory sink has the rows while the gate is still closed.
    let (h, shutdown, task) = h.start(&[tp(0)], &[(tp(0), 0..10)]).await;
    let opener = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        gate.store(true, std::sync::atomic::Ordering::Release);
    });
    let sink = h.sink.clone();
    assert_eq!(h.leave(shutdown, task, &[], &[tp(0)]).await, [(tp(0), 10)]);
    opener.await.unwrap();
    let log = sink.lock().unwrap();
    assert_eq!(log.durable[&tp(0)], (0..10).collect::<Vec<_>>());
    assert!(log.discarded.is_empty());
}

/// When the Redis write cannot be finished at all, the segment holding rows Redis lacks is
/// never made durable, and nothing of the partition is committed: its next owner consumes it
/// again (the shutdown test of the failure suite lost rows this way once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_shutdown_cuts_short_for_good_leaves_its_partition_uncommitted() {
    let gate = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = Harness::with(vec![Box::new(GateSink(gate))]);
    let (h, shutdown, task) = h.start(&[tp(0)], &[(tp(0), 0..10)]).await;
    let (sink, commits) = (h.sink.clone(), h.commits.clone());
    assert_eq!(h.leave(shutdown, task, &[], &[tp(0)]).await, []);
    let log = sink.lock().unwrap();
    assert!(log.durable.is_empty(), "{:?}", log.durable);
    assert_eq!(log.discarded, [tp(0)]);
    assert!(commits.of(&tp(0)).iter().all(|o| *o == 0));
}
