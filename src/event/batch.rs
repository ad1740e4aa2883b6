//! Batches as consumed and as decoded, and the source's events.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc as std_mpsc, Arc, OnceLock,
    },
    time::Instant,
};

use arrow::record_batch::RecordBatch;

use super::{Failure, Rejected, Span, TopicPartition};

/// A Kafka header: name and value (absent for a null value).
pub type RawHeader = (String, Option<Vec<u8>>);

/// One message of a [`RawBatch`]; its bytes live in the batch's buffer.
#[derive(Debug)]
pub struct RawMessage {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) timestamp: Option<i64>,
    pub(crate) key: Option<std::ops::Range<usize>>,
    pub(crate) payload: Option<std::ops::Range<usize>>,
    pub(crate) headers: Vec<RawHeader>,
    /// A header name that is not UTF-8 (as received, made lossy in `headers`).
    pub(crate) bad_header: Option<String>,
}

/// Messages as consumed, not yet decoded.
#[derive(Debug, Default)]
pub struct RawBatch {
    pub(crate) messages: Vec<RawMessage>,
    /// Keys and payloads, back to back.
    pub(crate) bytes: Vec<u8>,
    pub(crate) spans: Vec<(TopicPartition, Span)>,
    pub(crate) payload_bytes: usize,
    /// When its first message was polled.
    pub(crate) consumed_at: Option<Instant>,
    /// Counts the batch in its source's [`Backlog`] until the pipeline task takes it.
    pub(crate) ticket: Option<Ticket>,
}

/// The batches a source has closed that the pipeline task has not yet taken (queued, being
/// decoded, or waiting for the pipeline): with `batch.eager`, a batch closes early only when
/// there are none, so that at most one waits for the pipeline while it is busy and batches
/// grow with the load (group commit).
#[derive(Debug, Default, Clone)]
pub struct Backlog(Arc<AtomicUsize>);

impl Backlog {
    /// A ticket for one more batch, counted until it is dropped.
    pub fn ticket(&self) -> Ticket {
        self.0.fetch_add(1, Ordering::AcqRel);
        Ticket(self.0.clone())
    }

    /// Batches closed and not yet taken.
    pub fn len(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One batch in a [`Backlog`]; the pipeline task drops it when it takes the batch (and any
/// other owner when it drops the batch), so the count never leaks.
#[derive(Debug)]
pub struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RawBatch {
    /// Events in the batch.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// Where an event is: topic, partition, offset.
type Position = (Arc<str>, i32, i64);

/// A record's key and payload, as consumed.
pub type KeyAndPayload = (Option<Vec<u8>>, Option<Vec<u8>>);

/// The original key, bytes and headers of a batch's valid events.
#[derive(Debug)]
pub struct Originals {
    messages: Vec<RawMessage>,
    bytes: Vec<u8>,
    /// (topic, partition, offset) → message; built on the first lookup (failures are rare).
    /// The topic is part of the key: in a multi-topic pipeline, partitions and offsets repeat.
    index: OnceLock<HashMap<Position, usize>>,
}

impl Originals {
    /// The valid events of a batch, with the buffer their ranges point into.
    pub fn new(messages: Vec<RawMessage>, bytes: Vec<u8>) -> Self {
        Self {
            messages,
            bytes,
            index: OnceLock::new(),
        }
    }

    /// The key and payload of the event at `topic`/`partition`@`offset`.
    pub fn message(&self, topic: &str, partition: i32, offset: i64) -> Option<KeyAndPayload> {
        let m = self.find(topic, partition, offset)?;
        Some((
            m.key.clone().map(|r| self.bytes[r].to_vec()),
            m.payload.clone().map(|r| self.bytes[r].to_vec()),
        ))
    }

    fn find(&self, topic: &str, partition: i32, offset: i64) -> Option<&RawMessage> {
        let index = self.index.get_or_init(|| {
            self.messages
                .iter()
                .enumerate()
                .map(|(i, m)| ((m.topic.clone(), m.partition, m.offset), i))
                .collect()
        });
        Some(&self.messages[*index.get(&(Arc::from(topic), partition, offset))?])
    }

    /// The event at `topic`/`partition`@`offset`, rejected for `error`.
    pub fn rejected(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        error: Failure,
    ) -> Option<Rejected> {
        let m = self.find(topic, partition, offset)?;
        Some(Rejected {
            key: m.key.clone().map(|r| self.bytes[r].to_vec()),
            payload: m.payload.clone().map(|r| self.bytes[r].to_vec()),
            topic: m.topic.clone(),
            partition,
            offset,
            timestamp: m.timestamp,
            headers: m.headers.clone(),
            error,
        })
    }
}

/// One micro-batch: the valid rows, the rejected events, and the offsets they cover.
#[derive(Debug)]
pub struct SourceBatch {
    pub rows: RecordBatch,
    pub rejected: Vec<Rejected>,
    /// Every offset in each span is either a row or a rejected event.
    pub spans: Vec<(TopicPartition, Span)>,
    pub payload_bytes: usize,
    /// The valid events' original bytes, when asked for.
    pub originals: Option<Arc<Originals>>,
    /// When the batch's first event was consumed.
    pub consumed_at: Instant,
    /// Counts the batch in its source's [`Backlog`]: dropped when the pipeline task takes it.
    pub ticket: Option<Ticket>,
}

impl SourceBatch {
    /// Events in the batch, valid or not.
    pub fn events(&self) -> usize {
        self.rows.num_rows() + self.rejected.len()
    }
}

/// What the source tells the pipeline, in the order it happened. The decode stage
/// ([`crate::decode::stage`]) turns each `RawBatch` into a decoded batch `B` on the way.
pub enum SourceEvent<B = RawBatch> {
    Batch(B),
    /// Partitions are about to be assigned, each with the group's committed offset (`None`
    /// where there is none, or it could not be read). Reply with each partition's resume
    /// offset from the sinks' own records (`None` where they have none).
    Assigned {
        partitions: Vec<(TopicPartition, Option<i64>)>,
        reply: std_mpsc::SyncSender<Vec<(TopicPartition, Option<i64>)>>,
    },
    /// Partitions are being revoked. Finish their data and reply with the offsets to commit,
    /// unless they are [`Fence`]d (then discard their data: they are already released).
    Revoked {
        partitions: Vec<TopicPartition>,
        reply: std_mpsc::SyncSender<Vec<(TopicPartition, i64)>>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding A1: two topics with equal (partition, offset) in one batch; the
    /// original of each is found, not only the one indexed last.
    #[test]
    fn originals_are_found_by_topic_partition_and_offset() {
        let message = |topic: &str, payload: std::ops::Range<usize>| RawMessage {
            topic: Arc::from(topic),
            partition: 0,
            offset: 42,
            timestamp: None,
            key: None,
            payload: Some(payload),
            headers: Vec::new(),
            bad_header: None,
        };
        let originals = Originals::new(
            vec![message("orders", 0..1), message("payments", 1..2)],
            b"op".to_vec(),
        );
        let failure = || Failure::Redis {
            reason: "wrong_type",
            error: "WRONGTYPE".into(),
        };
        let payload = |topic| {
            originals
                .rejected(topic, 0, 42, failure())
                .and_then(|r| r.payload)
        };
        assert_eq!(payload("orders").as_deref(), Some(&b"o"[..]));
        assert_eq!(payload("payments").as_deref(), Some(&b"p"[..]));
        assert_eq!(payload("refunds"), None);
    }
}
