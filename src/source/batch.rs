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
    event::{Backlog, RawBatch, RawHeader, RawMessage, Span, TopicPartition},
};

/// How long one poll lasts at most while the open batch waits only for the pipeline task to
/// take the batch before it ([`Batcher::waits_for_pipeline`]).
pub const TAKEN_POLL: Duration = Duration::from_millis(1);

/// Assembles micro-batches of raw messages.
pub struct Batcher {
    spec: BatchSpec,
    topics: HashMap<String, Arc<str>>,
    open: RawBatch,
    spans: HashMap<TopicPartition, Span>,
    /// When the first event of the open batch arrived.
    started: Option<Instant>,
    /// The closed batches the pipeline task has not taken yet.
    backlog: Backlog,
}

impl Batcher {
    pub fn new(spec: BatchSpec) -> Self {
        Self {
            spec,
            topics: HashMap::new(),
            open: RawBatch::default(),
            spans: HashMap::new(),
            started: None,
            backlog: Backlog::default(),
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

    /// Whether the open batch may close now that nothing more is ready (`batch.eager`): it
    /// has an event, and no batch closed before it is still waiting for the pipeline task. So
    /// an idle pipeline gets each event at once, and a busy one the next batch as soon as it
    /// takes the last, holding what arrived meanwhile: batches grow with the load.
    pub fn closes_early(&self) -> bool {
        self.eager_and_open() && self.backlog.is_empty()
    }

    /// Whether the open batch would close now but for a batch before it that the pipeline
    /// task has not taken yet. The source then polls in short slices
    /// ([`TAKEN_POLL`]), so that the batch goes within a millisecond of that one being taken
    /// rather than when the next fetch brings a message (or its delay runs out).
    pub fn waits_for_pipeline(&self) -> bool {
        self.eager_and_open() && !self.backlog.is_empty()
    }

    /// `batch.eager`, and the open batch has an event.
    fn eager_and_open(&self) -> bool {
        self.spec.eager && self.started.is_some()
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
        batch.ticket = Some(self.backlog.ticket());
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

    fn batcher(eager: bool) -> Batcher {
        Batcher::new(BatchSpec {
            max_rows: 1000,
            max_bytes: 1 << 20,
            max_delay: Duration::from_millis(500),
            max_in_flight: 2,
            eager,
        })
    }

    /// What `push` does for a message at `offset` of `orders`/0, without a broker.
    fn arrive(batcher: &mut Batcher, offset: i64) {
        let topic = batcher.topic("orders");
        batcher.open.messages.push(RawMessage {
            topic: topic.clone(),
            partition: 0,
            offset,
            timestamp: None,
            key: None,
            payload: None,
            headers: Vec::new(),
            bad_header: None,
        });
        let span = batcher.spans.entry((topic, 0)).or_insert(Span {
            first: offset,
            next: offset,
        });
        span.next = offset + 1;
        batcher.started.get_or_insert_with(Instant::now);
    }

    #[test]
    fn an_eager_batch_closes_early_only_while_no_earlier_batch_waits_for_the_pipeline() {
        let mut batcher = batcher(true);
        assert!(!batcher.closes_early(), "an empty batch never closes");
        arrive(&mut batcher, 0);
        assert!(
            batcher.closes_early(),
            "an idle pipeline gets the event at once"
        );
        let first = batcher.take().expect("a batch");

        // The first batch has not been taken by the pipeline task: the next one grows.
        assert!(
            !batcher.waits_for_pipeline(),
            "an empty batch waits for nothing"
        );
        arrive(&mut batcher, 1);
        arrive(&mut batcher, 2);
        assert!(!batcher.closes_early());
        assert!(
            batcher.waits_for_pipeline(),
            "the source polls in short slices"
        );
        assert_eq!(batcher.backlog.len(), 1);

        // The pipeline task takes it (drops its ticket): the next closes at once, with both.
        drop(first.ticket);
        assert!(!batcher.waits_for_pipeline());
        assert!(batcher.closes_early());
        let second = batcher.take().expect("a batch");
        assert_eq!(second.messages.len(), 2);
        assert_eq!(second.spans.len(), 1);
        assert_eq!(second.spans[0].1.first, 1);
        assert_eq!(second.spans[0].1.next, 3);

        // A batch dropped anywhere else (a revoked partition, a shutdown) releases its ticket too.
        drop(second);
        assert!(batcher.backlog.is_empty());
    }

    #[test]
    fn a_batch_without_eager_waits_for_its_rows_bytes_or_delay() {
        let mut batcher = batcher(false);
        arrive(&mut batcher, 0);
        let first = batcher.take().expect("a batch");
        arrive(&mut batcher, 1);
        assert!(!batcher.closes_early());
        assert!(!batcher.waits_for_pipeline(), "it waits for its delay");
        assert!(!batcher.is_full());
        drop(first);
        assert!(batcher.until_due().is_some());
    }
}
