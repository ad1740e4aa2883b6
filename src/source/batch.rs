//! Micro-batching: the source thread copies messages from any assigned partitions into one
//! buffer per batch ([`RawBatch`]) until the batch is full or old enough; the pipeline task
//! decodes it ([`RawBatch::decode`]), so polling and decoding run on different cores.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use arrow::record_batch::RecordBatch;
use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::{
    config::BatchSpec,
    decode::{DecodeError, Decoder, Origin},
    score::InferenceError,
};

/// One message of a [`RawBatch`]; its bytes live in the batch's buffer.
#[derive(Debug)]
struct RawMessage {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<std::ops::Range<usize>>,
    payload: Option<std::ops::Range<usize>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Messages as consumed, not yet decoded.
#[derive(Debug, Default)]
pub struct RawBatch {
    messages: Vec<RawMessage>,
    /// Keys and payloads, back to back.
    bytes: Vec<u8>,
    spans: Vec<(TopicPartition, Span)>,
    payload_bytes: usize,
    /// When its first message was polled.
    consumed_at: Option<Instant>,
}

impl RawBatch {
    /// Events in the batch.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Decodes and validates every event: valid ones become rows, the others [`Rejected`]
    /// with their original key, bytes and headers. With `keep_originals`, the valid events'
    /// bytes stay available too (for later stages that may still reject them). CPU-heavy.
    pub fn decode(self, decoder: &mut Decoder, keep_originals: bool) -> SourceBatch {
        let mut rejected = Vec::new();
        let mut kept = Vec::new();
        for m in self.messages {
            let payload = m.payload.clone().map(|r| &self.bytes[r]);
            let origin = Origin {
                topic: &m.topic,
                partition: m.partition,
                offset: m.offset,
                timestamp: m.timestamp,
            };
            if let Err(error) = decoder.push(origin, payload) {
                rejected.push(Rejected {
                    key: m.key.map(|r| self.bytes[r].to_vec()),
                    payload: payload.map(<[u8]>::to_vec),
                    topic: m.topic,
                    partition: m.partition,
                    offset: m.offset,
                    timestamp: m.timestamp,
                    headers: m.headers,
                    error: Failure::Decode(error),
                });
            } else if keep_originals {
                kept.push(m);
            }
        }
        let originals = keep_originals.then(|| {
            Arc::new(Originals {
                messages: kept,
                bytes: self.bytes,
                index: OnceLock::new(),
            })
        });
        SourceBatch {
            rows: decoder.finish(),
            rejected,
            spans: self.spans,
            payload_bytes: self.payload_bytes,
            originals,
            consumed_at: self.consumed_at.unwrap_or_else(Instant::now),
        }
    }
}

/// The original key, bytes and headers of a batch's valid events.
#[derive(Debug)]
pub struct Originals {
    messages: Vec<RawMessage>,
    bytes: Vec<u8>,
    /// (partition, offset) → message; built on the first lookup (failures are rare).
    index: OnceLock<HashMap<(i32, i64), usize>>,
}

impl Originals {
    /// The event at `topic`/`partition`@`offset`, rejected for `error`.
    pub fn rejected(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        error: Failure,
    ) -> Option<Rejected> {
        let index = self.index.get_or_init(|| {
            self.messages
                .iter()
                .enumerate()
                .map(|(i, m)| ((m.partition, m.offset), i))
                .collect()
        });
        let m = &self.messages[*index.get(&(partition, offset))?];
        (*m.topic == *topic).then(|| Rejected {
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

/// Why an event was rejected, and by which stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    Decode(DecodeError),
    Inference {
        model: Arc<str>,
        error: InferenceError,
    },
}

impl Failure {
    /// The stage that rejected the event: `decode` or `inference`.
    pub fn stage(&self) -> &'static str {
        match self {
            Self::Decode(_) => "decode",
            Self::Inference { .. } => "inference",
        }
    }

    /// Stable short code (the `sluice.reason` header).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Decode(e) => e.reason(),
            Self::Inference { error, .. } => error.reason(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Decode(e) => e.fmt(f),
            Self::Inference { model, error } => write!(f, "model {model}: {error}"),
        }
    }
}

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
    pub error: Failure,
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
    /// The valid events' original bytes, when asked for.
    pub originals: Option<Arc<Originals>>,
    /// When the batch's first event was consumed.
    pub consumed_at: Instant,
}

impl SourceBatch {
    /// Events in the batch, valid or not.
    pub fn events(&self) -> usize {
        self.rows.num_rows() + self.rejected.len()
    }
}

/// Assembles micro-batches of raw messages.
pub struct Batcher {
    spec: BatchSpec,
    topics: HashMap<String, Arc<str>>,
    open: RawBatch,
    spans: HashMap<TopicPartition, Span>,
    /// When the first event of the open batch arrived.
    started: Option<Instant>,
}

impl Batcher {
    pub fn new(spec: BatchSpec) -> Self {
        Self {
            spec,
            topics: HashMap::new(),
            open: RawBatch::default(),
            spans: HashMap::new(),
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

    /// Copies one message into the open batch.
    pub fn push(&mut self, msg: &BorrowedMessage<'_>) {
        let topic = self.topic(msg.topic());
        let (partition, offset) = (msg.partition(), msg.offset());
        let bytes = &mut self.open.bytes;
        let mut copy = |data: Option<&[u8]>| {
            data.map(|d| {
                let start = bytes.len();
                bytes.extend_from_slice(d);
                start..bytes.len()
            })
        };
        let key = copy(msg.key());
        let payload = copy(msg.payload());
        self.open.payload_bytes += payload.as_ref().map_or(0, |r| r.len());
        let headers = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        self.open.messages.push(RawMessage {
            topic: topic.clone(),
            partition,
            offset,
            timestamp: msg.timestamp().to_millis(),
            key,
            payload,
            headers,
        });
        let span = self.spans.entry((topic, partition)).or_insert(Span {
            first: offset,
            next: offset,
        });
        span.first = span.first.min(offset);
        span.next = span.next.max(offset + 1);
        self.started.get_or_insert_with(Instant::now);
    }

    /// The batch is full by rows or bytes.
    pub fn is_full(&self) -> bool {
        self.open.len() >= self.spec.max_rows || self.open.payload_bytes >= self.spec.max_bytes
    }

    /// How long until the open batch must be sent (`None` when it is empty).
    pub fn until_due(&self) -> Option<Duration> {
        self.started
            .map(|s| self.spec.max_delay.saturating_sub(s.elapsed()))
    }

    /// Closes the open batch, if it has any event.
    pub fn take(&mut self) -> Option<RawBatch> {
        self.started?;
        let started = self.started.take();
        let mut batch = std::mem::take(&mut self.open);
        batch.spans = self.spans.drain().collect();
        batch.consumed_at = started;
        // The next batch will be about as big.
        self.open.messages.reserve(batch.messages.len());
        self.open.bytes.reserve(batch.bytes.len());
        Some(batch)
    }
}
