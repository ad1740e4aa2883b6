//! The dead-letter topic: every rejected event, with its original key, bytes and headers, and
//! `sluice.*` headers that say where it came from and why it was rejected.
//!
//! A dead letter counts as delivered only when the broker acknowledges it. A failed delivery
//! is retried with backoff until it succeeds or the pipeline stops; until then its offset,
//! and every offset after it in the partition, stays uncommitted.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use rdkafka::{
    error::KafkaError,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use tracing::warn;

use crate::source::Rejected;

/// Header names, stable: consumers of the dead-letter topic rely on them.
pub mod headers {
    pub const TOPIC: &str = "sluice.topic";
    pub const PARTITION: &str = "sluice.partition";
    pub const OFFSET: &str = "sluice.offset";
    /// Kafka timestamp of the original message, milliseconds since the epoch (empty if none).
    pub const TIMESTAMP: &str = "sluice.timestamp";
    pub const PIPELINE: &str = "sluice.pipeline";
    /// The stage that rejected the event (`decode` or `inference`).
    pub const STAGE: &str = "sluice.stage";
    /// Stable short code, e.g. `missing_field`.
    pub const REASON: &str = "sluice.reason";
    /// Human-readable error.
    pub const ERROR: &str = "sluice.error";
    /// On predictions and feedback records: the model's name and the version that scored.
    pub const MODEL: &str = "sluice.model";
    pub const MODEL_VERSION: &str = "sluice.model_version";
}

/// Produces rejected events to the dead-letter topic.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: Arc<str>,
    pipeline: Arc<str>,
}

impl DeadLetters {
    /// A producer for `topic`, with the source's bootstrap servers and the given properties.
    pub fn new(
        pipeline: &str,
        bootstrap_servers: &str,
        topic: &str,
        properties: &BTreeMap<String, String>,
    ) -> Result<Self, KafkaError> {
        let defaults = [("acks", "all"), ("linger.ms", "5")];
        Ok(Self {
            producer: super::producer(bootstrap_servers, &defaults, properties)?,
            topic: Arc::from(topic),
            pipeline: Arc::from(pipeline),
        })
    }

    /// Sends one dead letter; the future resolves once the broker has acknowledged it,
    /// retrying failed deliveries with backoff.
    pub fn send(&self, rejected: Rejected) -> BoxFuture<'static, Rejected> {
        let this = self.clone();
        Box::pin(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match this.send_once(&rejected).await {
                    Ok(()) => return rejected,
                    Err(error) => {
                        warn!(%error, topic = %rejected.topic, partition = rejected.partition,
                              offset = rejected.offset, "Dead letter not delivered; retrying.");
                        metrics::counter!("sluice_dead_letter_retries_total",
                            "pipeline" => this.pipeline.to_string())
                        .increment(1);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        })
    }

    async fn send_once(&self, r: &Rejected) -> Result<(), KafkaError> {
        let (partition, offset) = (r.partition.to_string(), r.offset.to_string());
        let timestamp = r.timestamp.map(|t| t.to_string()).unwrap_or_default();
        let error = r.error.to_string();
        let mut hs = OwnedHeaders::new_with_capacity(r.headers.len() + 8);
        for (key, value) in &r.headers {
            hs = hs.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        for (key, value) in [
            (headers::TOPIC, &*r.topic),
            (headers::PARTITION, &partition),
            (headers::OFFSET, &offset),
            (headers::TIMESTAMP, &timestamp),
            (headers::PIPELINE, &self.pipeline),
            (headers::STAGE, r.error.stage()),
            (headers::REASON, r.error.reason()),
            (headers::ERROR, &error),
        ] {
            hs = hs.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(hs);
        if let Some(key) = &r.key {
            record = record.key(key);
        }
        if let Some(payload) = &r.payload {
            record = record.payload(payload);
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
