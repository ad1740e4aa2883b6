//! Micro-batching: messages from any assigned partitions are decoded straight from librdkafka's
//! buffers into Arrow builders until the batch is full or old enough. Only rejected events are
//! copied, since the dead-letter topic needs their original bytes.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use arrow::record_batch::RecordBatch;
use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::{
    config::BatchSpec,
    decode::{DecodeError, Decoder, Origin},
};

/// A topic and partition; topic names are shared, not copied per message.
pub type TopicPartition = (Arc<str>, i32);

/// An event that failed to decode, with everything the dead-letter topic needs.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Kafka message timestamp, milliseconds since the epoch.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The original headers, in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub error: DecodeError,
}

/// The offsets a batch covers in one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub first: i64,
    /// One past the last offset.
    pub next: i64,
}

/// One micro-batch: the valid rows, the rejected events, and the offsets they cover.
#[derive(Debug)]
pub struct SourceBatch {
    pub rows: RecordBatch,
    pub rejected: Vec<Rejected>,
    /// Every offset in each span is either a row or a rejected event.
    pub spans: Vec<(TopicPartition, Span)>,
    pub payload_bytes: usize,
}

impl SourceBatch {
    /// Events in the batch, valid or not.
    pub fn events(&self) -> usize {
        self.rows.num_rows() + self.rejected.len()
    }
}

/// Assembles micro-batches.
pub struct Batcher {
    decoder: Decoder,
    spec: BatchSpec,
    topics: HashMap<String, Arc<str>>,
    rejected: Vec<Rejected>,
    spans: HashMap<TopicPartition, Span>,
    bytes: usize,
    events: usize,
    /// When the first event of the open batch arrived.
    started: Option<Instant>,
}

impl Batcher {
    pub fn new(decoder: Decoder, spec: BatchSpec) -> Self {
        Self {
            decoder,
            spec,
            topics: HashMap::new(),
            rejected: Vec::new(),
            spans: HashMap::new(),
            bytes: 0,
            events: 0,
            started: None,
        }
    }

    fn topic(&mut self, name: &str) -> Arc<str> {
        if let Some(t) = self.topics.get(name) {
            return t.clone();
        }
        let t: Arc<str> = Arc::from(name);
        self.topics.insert(name.to_owned(), t.clone());
        t
    }

    /// Decodes one message into the open batch.
    pub fn push(&mut self, msg: &BorrowedMessage<'_>) {
        let topic = self.topic(msg.topic());
        let (partition, offset) = (msg.partition(), msg.offset());
        let timestamp = msg.timestamp().to_millis();
        let origin = Origin {
            topic: &topic,
            partition,
            offset,
            timestamp,
        };
        let payload = msg.payload();
        if let Err(error) = self.decoder.push(origin, payload) {
            self.rejected.push(Rejected {
                topic: topic.clone(),
                partition,
                offset,
                timestamp,
                key: msg.key().map(<[u8]>::to_vec),
                payload: payload.map(<[u8]>::to_vec),
                headers: msg
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
                error,
            });
        }
        let span = self.spans.entry((topic, partition)).or_insert(Span {
            first: offset,
            next: offset,
        });
        span.first = span.first.min(offset);
        span.next = span.next.max(offset + 1);
        self.bytes += payload.map_or(0, <[u8]>::len);
        self.events += 1;
        self.started.get_or_insert_with(Instant::now);
    }

    /// The batch is full by rows or bytes.
    pub fn is_full(&self) -> bool {
        self.events >= self.spec.max_rows || self.bytes >= self.spec.max_bytes
    }

    /// How long until the open batch must be sent (`None` when it is empty).
    pub fn until_due(&self) -> Option<Duration> {
        self.started
            .map(|s| self.spec.max_delay.saturating_sub(s.elapsed()))
    }

    /// Closes the open batch, if it has any event.
    pub fn take(&mut self) -> Option<SourceBatch> {
        self.started.take()?;
        let batch = SourceBatch {
            rows: self.decoder.finish(),
            rejected: std::mem::take(&mut self.rejected),
            spans: self.spans.drain().collect(),
            payload_bytes: self.bytes,
        };
        self.bytes = 0;
        self.events = 0;
        Some(batch)
    }
}
