//! Micro-batching: the source thread copies messages from any assigned partitions into one
//! buffer per batch ([`RawBatch`]) until the batch is full or old enough; the pipeline task
//! decodes it ([`RawBatch::decode`]), so polling and decoding run on different cores.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use arrow::record_batch::RecordBatch;
use rdkafka::message::{BorrowedMessage, Message};

use crate::{
    config::BatchSpec,
    decode::{DecodeError, Decoder, Origin},
    score::InferenceError,
};

/// A Kafka header: name and value (absent for a null value).
pub type RawHeader = (String, Option<Vec<u8>>);

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
    /// A header name that is not UTF-8 (as received, made lossy in `headers`).
    bad_header: Option<String>,
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
            let decoded = match &m.bad_header {
                Some(name) => Err(DecodeError::BadHeader { name: name.clone() }),
                None => decoder.push(origin, payload),
            };
            if let Err(error) = decoded {
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

/// Where an event is: topic, partition, offset.
type Position = (Arc<str>, i32, i64);

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
                .map(|(i, m)| ((m.topic.clone(), m.partition, m.offset), i))
                .collect()
        });
        let m = &self.messages[*index.get(&(Arc::from(topic), partition, offset))?];
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

/// Why an event was rejected, and by which stage. The stage also says which outputs lack
/// it: `decode` (none has it), `inference` (no prediction), `redis` (its features were not
/// written; Parquet and the models have it).
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    Decode(DecodeError),
    Inference {
        model: Arc<str>,
        error: InferenceError,
    },
    /// Redis refused this entity's write for good (a key of another type, a script error on
    /// its stored data).
    Redis {
        /// Stable short code: `wrong_type`, `script_error`, `refused`.
        reason: &'static str,
        /// The server's error.
        error: String,
    },
}

impl Failure {
    /// The stage that rejected the event: `decode`, `inference` or `redis`.
    pub fn stage(&self) -> &'static str {
        match self {
            Self::Decode(_) => "decode",
            Self::Inference { .. } => "inference",
            Self::Redis { .. } => "redis",
        }
    }

    /// Stable short code (the `sluice.reason` header).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Decode(e) => e.reason(),
            Self::Inference { error, .. } => error.reason(),
            Self::Redis { reason, .. } => reason,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Decode(e) => e.fmt(f),
            Self::Inference { model, error } => write!(f, "model {model}: {error}"),
            Self::Redis { error, .. } => write!(f, "redis: {error}"),
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
        let (headers, bad_header) = headers_of(msg);
        self.open.messages.push(RawMessage {
            topic: topic.clone(),
            partition,
            offset,
            timestamp: msg.timestamp().to_millis(),
            key,
            payload,
            headers,
            bad_header,
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

/// A message's headers, read straight from librdkafka, and the first name that is not UTF-8.
/// rust-rdkafka's own iterator panics on such a name (`CStr::to_str().unwrap()`), which would
/// kill the source thread (review finding A3); here the name is kept lossily and the event is
/// rejected (`bad_header`).
fn headers_of(msg: &BorrowedMessage<'_>) -> (Vec<RawHeader>, Option<String>) {
    use rdkafka::bindings as rd;
    let mut out = Vec::new();
    let mut bad = None;
    // SAFETY: the message pointer is valid while `msg` is borrowed, and librdkafka's headers
    // belong to the message; names are NUL-terminated and values (name, pointer, size) stay
    // valid as long as the headers do. Everything is copied before returning.
    unsafe {
        let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        if rd::rd_kafka_message_headers(msg.ptr(), &mut hdrs)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            return (out, None);
        }
        for i in 0..rd::rd_kafka_header_cnt(hdrs) {
            let mut name: *const std::ffi::c_char = std::ptr::null();
            let mut value: *const std::ffi::c_void = std::ptr::null();
            let mut size = 0usize;
            if rd::rd_kafka_header_get_all(hdrs, i, &mut name, &mut value, &mut size)
                != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            {
                break;
            }
            let name = std::ffi::CStr::from_ptr(name).to_bytes();
            let name = match std::str::from_utf8(name) {
                Ok(n) => n.to_owned(),
                Err(_) => {
                    let lossy = String::from_utf8_lossy(name).into_owned();
                    bad.get_or_insert_with(|| lossy.clone());
                    lossy
                }
            };
            let value = (!value.is_null())
                .then(|| std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec());
            out.push((name, value));
        }
    }
    (out, bad)
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
        let originals = Originals {
            messages: vec![message("orders", 0..1), message("payments", 1..2)],
            bytes: b"op".to_vec(),
            index: OnceLock::new(),
        };
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
