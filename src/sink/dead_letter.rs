//! The dead-letter topic: every rejected event, with its original key, bytes and headers, and
//! `sluice.*` headers that say where it came from and why it was rejected.
//!
//! A dead letter counts as delivered only when the broker acknowledges it; until then its
//! offset, and every offset after it in the partition, stays uncommitted. Failures follow
//! [`crate::failure`]: a transient one is retried with backoff; a record the producer or the
//! broker refuses as too large is **truncated** to fit (header `sluice.truncated = true`, and
//! `sluice.original_size` with the payload's size in bytes), halving again if the broker's
//! limit is lower still, so a dead letter always gets through; a missing topic or a refused
//! authorization fails the pipeline.
//!
//! The producer's `message.max.bytes` follows `errors.max_event_size` (plus room for the key
//! and headers), so an event that was small enough to be decoded is never cut.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use rdkafka::{
    error::KafkaError,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    event::Rejected,
    failure::{self, Class, GaveUp, Retrying},
    sink::headers,
};

/// Room beyond `max_event_size` for the key, the headers and the record's framing.
const HEADROOM: usize = 64 * 1024;
/// librdkafka's own default `message.max.bytes`; sluice never asks for less.
const KAFKA_DEFAULT_MAX: usize = 1_000_000;
/// Bytes of a record beyond its key, payload and header bytes (framing, varints), with margin.
const RECORD_OVERHEAD: usize = 512;

/// Why a dead letter could not be delivered: the pipeline fails.
#[derive(Debug, Error)]
pub enum DeadLetterError {
    /// The task sending it panicked or was cancelled (a bug): the pipeline fails.
    #[error("the task sending a dead letter stopped: {0}")]
    Stopped(String),
    /// The broker refuses the topic itself: it does not exist, or sluice may not write to it.
    #[error(
        "the dead-letter topic {topic:?} refuses records ({source}); create it or grant \
             sluice write access, or fix errors.dead_letter_topic"
    )]
    Topic {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// Even the key and headers alone are larger than the topic takes.
    #[error(
        "the dead-letter topic {topic:?} refuses even a {size}-byte record with the \
             payload cut away ({source}); raise its max.message.bytes"
    )]
    TooLarge {
        topic: String,
        size: usize,
        #[source]
        source: KafkaError,
    },
}

/// Produces rejected events to the dead-letter topic.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: Arc<str>,
    pipeline: Arc<str>,
    /// The producer's `message.max.bytes`: larger records are truncated before they are sent.
    max_record: usize,
}

impl DeadLetters {
    /// A producer for `topic`, with the source's bootstrap servers and the given properties; its
    /// `message.max.bytes` is `max_event_size` plus room for key and headers, unless the
    /// properties set it.
    pub fn new(
        pipeline: &str,
        bootstrap_servers: &str,
        topic: &str,
        properties: &BTreeMap<String, String>,
        max_event_size: usize,
    ) -> Result<Self, KafkaError> {
        let max_record = match properties.get("message.max.bytes") {
            Some(v) => v.parse().unwrap_or(KAFKA_DEFAULT_MAX),
            None => (max_event_size + HEADROOM).max(KAFKA_DEFAULT_MAX),
        };
        let max = max_record.to_string();
        let defaults = [
            ("acks", "all"),
            ("linger.ms", "5"),
            ("message.max.bytes", max.as_str()),
        ];
        Ok(Self {
            producer: super::producer(bootstrap_servers, &defaults, properties)?,
            topic: Arc::from(topic),
            pipeline: Arc::from(pipeline),
            max_record,
        })
    }

    /// Checks, at start, that the topic exists (or that the broker creates it) and that sluice
    /// may write to it.
    pub async fn check_topic(&self) -> Result<(), super::TopicError> {
        super::check_topic(&self.producer, &self.topic).await
    }

    /// Sends one dead letter; the future resolves once the broker has acknowledged it,
    /// retrying transient failures and truncating a record that is too large.
    pub fn send(
        &self,
        rejected: Rejected,
    ) -> BoxFuture<'static, Result<Rejected, DeadLetterError>> {
        let this = self.clone();
        Box::pin(async move {
            let who = Retrying {
                pipeline: &this.pipeline,
                metric: "sluice_dead_letter_retries_total",
                what: "Dead letter delivery",
                healthy: None,
            };
            // The error text goes into a header and into the size estimate: render it once.
            let error_text = rejected.error.to_string();
            let mut budget = this
                .max_record
                .saturating_sub(overhead(&rejected, &error_text));
            loop {
                let sent = failure::retry(&who, &CancellationToken::new(), failure::kafka, || {
                    this.send_once(&rejected, &error_text, budget)
                })
                .await;
                let error = match sent {
                    Ok(()) => return Ok(rejected),
                    Err(GaveUp::Cancelled) => unreachable!("never cancelled"),
                    Err(GaveUp::Failed(_, e)) => e,
                };
                let cut = budget.min(rejected.payload.as_ref().map_or(0, Vec::len));
                match failure::kafka(&error) {
                    // Too large for the broker (its limit is lower than the producer's), or a
                    // record it refuses for its content: halve the payload until it goes.
                    Class::PerRecord if cut > 0 => {
                        budget = cut / 2;
                        warn!(pipeline = %this.pipeline, %error, topic = %rejected.topic,
                              partition = rejected.partition, offset = rejected.offset,
                              cut_to = budget, "Dead letter refused; truncating it.");
                    }
                    Class::PerRecord => {
                        return Err(DeadLetterError::TooLarge {
                            topic: this.topic.to_string(),
                            size: overhead(&rejected, &error_text),
                            source: error,
                        })
                    }
                    _ => {
                        return Err(DeadLetterError::Topic {
                            topic: this.topic.to_string(),
                            source: error,
                        })
                    }
                }
            }
        })
    }

    /// Sends the record once, with at most `budget` bytes of its payload.
    async fn send_once(&self, r: &Rejected, error: &str, budget: usize) -> Result<(), KafkaError> {
        let (partition, offset) = (r.partition.to_string(), r.offset.to_string());
        let timestamp = r.timestamp.map(|t| t.to_string()).unwrap_or_default();
        let payload = r.payload.as_deref();
        let original = payload.map_or(0, <[u8]>::len);
        let truncated = original > budget;
        let original_size = original.to_string();
        let mut hs = OwnedHeaders::new_with_capacity(r.headers.len() + 10);
        for (key, value) in &r.headers {
            hs = hs.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let ours = [
            (headers::TOPIC, &*r.topic),
            (headers::PARTITION, &partition),
            (headers::OFFSET, &offset),
            (headers::TIMESTAMP, &timestamp),
            (headers::PIPELINE, &self.pipeline),
            (headers::STAGE, r.error.stage()),
            (headers::REASON, r.error.reason()),
            (headers::ERROR, error),
        ];
        for (key, value) in ours {
            hs = hs.insert(Header {
                key,
                value: Some(value),
            });
        }
        if truncated {
            for (key, value) in [
                (headers::TRUNCATED, "true"),
                (headers::ORIGINAL_SIZE, &original_size),
            ] {
                hs = hs.insert(Header {
                    key,
                    value: Some(value),
                });
            }
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(hs);
        if let Some(key) = &r.key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(&payload[..original.min(budget)]);
        }
        if let Some(ts) = r.timestamp {
            record = record.timestamp(ts);
        }
        self.producer
            .send(record, Duration::from_secs(5))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }
}

/// The bytes of a dead letter beside its payload: key, original and `sluice.*` headers (the
/// error text included) and the record's framing.
fn overhead(r: &Rejected, error_text: &str) -> usize {
    let headers: usize = r
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 10)
        .sum();
    let ours = 400 + r.topic.len() + error_text.len();
    r.key.as_ref().map_or(0, Vec::len) + headers + ours + RECORD_OVERHEAD
}
