//! Rebalances, in librdkafka's rebalance callback on the poll thread. Neither direction waits
//! for the pipeline longer than the **deadline** (a third of `max.poll.interval.ms`, the
//! rebalance timeout), so a member whose pipeline is stuck on a sink still answers the group
//! in time and is never expelled for it:
//!
//! - **assign**: the pipeline recovers each partition from its sinks (with the committed
//!   offset, so that a committed segment is never rolled back), and the partition starts at
//!   max(committed offset, sinks' resume offset). If the pipeline has not answered by the
//!   deadline, the partitions are assigned **paused** at their committed offsets and stay
//!   paused, while the poll thread goes on, until the answer comes; then each is moved to its
//!   resume position and resumed ([`SourceContext::recovered`]).
//! - **revoke**: the open micro-batch is sent first, then the pipeline finishes the partitions'
//!   files and returns the offsets to commit; the callback commits them synchronously before
//!   the partitions are released, so nothing is written for a partition after it is revoked.
//!   When the deadline passes, or the assignment was **lost** (a session timeout: another
//!   member may own the partitions already), the partitions are [`Fence`]d before they are
//!   released: the pipeline then discards their open files instead of publishing them, and
//!   commits nothing for them.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, mpsc as std_mpsc, Arc},
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{CommitMode, Consumer, ConsumerContext, RebalanceProtocol},
    types::RDKafkaRespErr,
    Offset, TopicPartitionList,
};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::{initial_offset, offsets_list, send_until, KafkaConsumer, Shared, SourceContext};
use crate::event::{SourceEvent, TopicPartition};

/// The pipeline's answer to a question, in time or not.
enum Answer<T> {
    Now(T),
    /// Not by the deadline; it may still come on this channel.
    Later(std_mpsc::Receiver<T>),
    /// The pipeline is gone (shutdown).
    Gone,
}

/// The pipeline's answer to an assignment: where each partition resumes by its sinks.
type Resumes = Vec<(TopicPartition, Option<i64>)>;

/// Partitions assigned, paused, while the pipeline recovers them.
pub(super) struct Recovering {
    /// The pipeline's answer, until it comes; then where each partition resumes.
    answer: Result<TopicPartitionList, std_mpsc::Receiver<Resumes>>,
    committed: HashMap<TopicPartition, Option<i64>>,
    /// Failed attempts to move the partitions to their resume position.
    attempts: u32,
}

impl Recovering {
    pub(super) fn partitions(&self) -> impl Iterator<Item = &TopicPartition> {
        self.committed.keys()
    }
}

/// After this many failed attempts (one per poll) to move recovered partitions to their resume
/// position, the source stops, and so does the pipeline: consuming them from anywhere else
/// could write rows twice.
const SEEK_ATTEMPTS: u32 = 50;

impl SourceContext {
    /// Queues a question for the pipeline behind everything consumed before it and waits for
    /// the answer until `deadline`; an event that could not be sent by then stays queued, in
    /// order, for the poll loop to deliver later.
    fn ask_until<T>(
        &self,
        deadline: Instant,
        make: impl FnOnce(std_mpsc::SyncSender<T>) -> SourceEvent,
    ) -> Answer<T> {
        let mut shared = self.shared.lock().expect("source state lock");
        if shared.closed {
            return Answer::Gone;
        }
        let (reply, answer) = std_mpsc::sync_channel(1);
        queue_in_order(&mut shared, make(reply));
        while let Some(ev) = shared.outbox.pop_front() {
            match send_until(&self.tx, ev, deadline) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    shared.outbox.push_front(ev);
                    return Answer::Later(answer);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    shared.closed = true;
                    shared.outbox.clear();
                    return Answer::Gone;
                }
            }
        }
        drop(shared);
        match answer.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(t) => Answer::Now(t),
            Err(std_mpsc::RecvTimeoutError::Timeout) => Answer::Later(answer),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Answer::Gone,
        }
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
        let committed: HashMap<TopicPartition, Option<i64>> = partitions
            .iter()
            .map(|tp| {
                let offset = committed
                    .as_ref()
                    .and_then(|c| c.find_partition(&tp.0, tp.1))
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
                (tp.clone(), offset)
            })
            .collect();
        let deadline = Instant::now() + self.deadline;
        let answer = self.ask_until(deadline, |reply| SourceEvent::Assigned {
            partitions: partitions
                .iter()
                .map(|tp| (tp.clone(), committed[tp]))
                .collect(),
            reply,
        });
        let (resume, late) = match answer {
            Answer::Now(resume) => (resume, false),
            Answer::Gone => (Vec::new(), false),
            Answer::Later(answer) => {
                warn!(pipeline = %self.pipeline, partitions = ?names(&partitions),
                      deadline = ?self.deadline,
                      "The pipeline did not recover the assigned partitions in time; they stay \
                       paused until it has.");
                self.recovering
                    .lock()
                    .expect("recovering lock")
                    .push(Recovering {
                        answer: Err(answer),
                        committed: committed.clone(),
                        attempts: 0,
                    });
                self.any_recovering.store(true, Ordering::Release);
                (Vec::new(), true)
            }
        };
        let from_sinks: HashMap<_, _> = resume.into_iter().collect();
        for tp in &partitions {
            let start = self.start_of(tp, committed[tp], from_sinks.get(tp).copied().flatten());
            if let Err(error) = tpl.set_partition_offset(&tp.0, tp.1, start) {
                error!(%error, topic = %tp.0, partition = tp.1, "Cannot set the start offset.");
            }
        }
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
            _ => consumer.assign(tpl),
        };
        if let Err(error) = result {
            error!(%error, "Assign failed.");
        }
        if late {
            if let Err(error) = consumer.pause(tpl) {
                error!(%error, "Cannot pause partitions that are being recovered.");
            }
        }
    }

    /// Where a partition starts: after its committed offset and after what its sinks hold
    /// (`from_sinks`); with neither, where `start_from` says.
    fn start_of(
        &self,
        tp: &TopicPartition,
        committed: Option<i64>,
        from_sinks: Option<i64>,
    ) -> Offset {
        let Some(start) = committed.into_iter().chain(from_sinks).max() else {
            return initial_offset(self.start_from);
        };
        // Review finding A19: the files' own position wins over an earlier committed offset
        // (a crash before the commit, or an operator's reset): say so, since a reset to
        // reprocess does not reprocess what is already in Parquet.
        if let (Some(c), Some(s)) = (committed, from_sinks.filter(|s| Some(*s) > committed)) {
            info!(topic = %tp.0, partition = tp.1, committed = c, from_files = s,
                  "Resuming after the committed offset, where the finished files end; to \
                   reprocess, use a new pipeline name or remove its manifests.");
        } else {
            debug!(topic = %tp.0, partition = tp.1, ?committed, ?from_sinks, start,
                   "Resume position.");
        }
        Offset::Offset(start)
    }

    /// On the poll thread, between polls: partitions the pipeline has recovered since they
    /// were assigned (late, see the module docs) move to their resume position and are
    /// resumed, unless `paused` (backpressure), whose end resumes them.
    pub(super) fn recovered(&self, consumer: &KafkaConsumer, paused: bool) {
        // Called on every poll: almost always nothing is being recovered.
        if !self.any_recovering.load(Ordering::Acquire) {
            return;
        }
        let mut recovering = self.recovering.lock().expect("recovering lock");
        recovering.retain_mut(|r| {
            if let Err(answer) = &r.answer {
                match answer.try_recv() {
                    Ok(resume) => r.answer = Ok(self.resume_list(&r.committed, resume)),
                    Err(std_mpsc::TryRecvError::Empty) => return true,
                    Err(std_mpsc::TryRecvError::Disconnected) => return false,
                }
            }
            let Ok(tpl) = &r.answer else {
                unreachable!("answered above")
            };
            let moved = consumer
                .seek_partitions(tpl.clone(), Duration::from_secs(10))
                .map_err(|e| e.to_string())
                .and_then(
                    |moved| match moved.elements().iter().find_map(|e| e.error().err()) {
                        Some(e) => Err(e.to_string()),
                        None => Ok(()),
                    },
                );
            if let Err(error) = moved {
                r.attempts += 1;
                warn!(%error, attempt = r.attempts,
                      "Cannot move recovered partitions to their resume position yet.");
                assert!(
                    r.attempts < SEEK_ATTEMPTS,
                    "cannot move recovered partitions to their resume position: {error}"
                );
                return true;
            }
            info!(pipeline = %self.pipeline, partitions = tpl.count(),
                  "The pipeline recovered the partitions assigned while it was busy; consuming \
                   them now.");
            if !paused {
                if let Err(error) = consumer.resume(tpl) {
                    error!(%error, "Cannot resume recovered partitions.");
                }
            }
            false
        });
        self.any_recovering
            .store(!recovering.is_empty(), Ordering::Release);
    }

    /// Where each recovered partition resumes, by its committed offset and the pipeline's
    /// answer.
    fn resume_list(
        &self,
        committed: &HashMap<TopicPartition, Option<i64>>,
        resume: Resumes,
    ) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (tp, from_sinks) in resume {
            let Some(&committed) = committed.get(&tp) else {
                continue;
            };
            let start = self.start_of(&tp, committed, from_sinks);
            if let Err(error) = tpl.add_partition_offset(&tp.0, tp.1, start) {
                error!(%error, topic = %tp.0, partition = tp.1, "Cannot set the start offset.");
            }
        }
        tpl
    }

    /// Forgets the recovery of partitions that are going away.
    fn forget_recovering(&self, partitions: &[TopicPartition]) {
        let mut recovering = self.recovering.lock().expect("recovering lock");
        for r in recovering.iter_mut() {
            r.committed.retain(|tp, _| !partitions.contains(tp));
            if let Ok(tpl) = &r.answer {
                let mut kept = TopicPartitionList::new();
                for e in tpl.elements() {
                    if r.committed
                        .contains_key(&(Arc::from(e.topic()), e.partition()))
                    {
                        let _ = kept.add_partition_offset(e.topic(), e.partition(), e.offset());
                    }
                }
                r.answer = Ok(kept);
            }
        }
        recovering.retain(|r| !r.committed.is_empty());
    }

    fn on_revoke(&self, consumer: &KafkaConsumer, tpl: &TopicPartitionList) {
        let partitions = partitions_of(tpl);
        let lost = consumer.assignment_lost();
        info!(pipeline = %self.pipeline, partitions = ?names(&partitions), lost,
              "Partitions revoked.");
        self.forget_recovering(&partitions);
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
            let deadline = Instant::now() + self.deadline;
            match self.ask_until(deadline, event) {
                Answer::Now(commits) => Some(commits),
                Answer::Gone => {
                    self.fence.fence(&partitions);
                    None
                }
                Answer::Later(_) => {
                    // Fence before releasing: the pipeline may still finish files of these
                    // partitions while another member takes them over.
                    self.fence.fence(&partitions);
                    warn!(pipeline = %self.pipeline, partitions = ?names(&partitions),
                          deadline = ?self.deadline,
                          "The pipeline did not finish the revoked partitions in time; their \
                           open files will be discarded and consumed again by their next owner.");
                    None
                }
            }
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
                self.recovering.lock().expect("recovering lock").clear();
                let _ = consumer.unassign();
            }
        }
        self.rebalanced.store(true, Ordering::Release);
    }
}

/// Queues `event` for the pipeline behind the open micro-batch (closed first), so that the
/// pipeline sees everything consumed before it; the poll loop delivers the queue in order.
pub(super) fn queue_in_order(shared: &mut Shared, event: SourceEvent) {
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
