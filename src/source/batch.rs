//! Micro-batching: the source thread copies messages from any assigned partitions into one
//! buffer per batch ([`RawBatch`]) until the batch is full or old enough; the decode stage
//! (`crate::decode::stage`, its own thread) decodes it, so polling and decoding run on
//! different cores.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use rdkafka::message::{BorrowedMessage, Message};

use crate::{
    config::BatchSpec,
    event::{RawBatch, RawHeader, RawMessage, Span, TopicPartition},
};

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

    /// Whether a batch closes as soon as nothing more is ready (`batch.eager`).
    pub fn eager(&self) -> bool {
        self.spec.eager
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
