//! Predictions and feedback records to Kafka.
//!
//! An idempotent producer (`acks=all`, `enable.idempotence=true`) keeps each partition's
//! records in order through the client's own retries; a record that still fails is sent
//! again with backoff until it is acknowledged or the pipeline stops. A batch counts as
//! delivered only when every one of its records is acknowledged.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use rdkafka::{
    error::KafkaError,
    message::OwnedHeaders,
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};
use tracing::warn;

/// One record to produce.
#[derive(Debug)]
pub struct Record {
    pub topic: Arc<str>,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: OwnedHeaders,
    /// Kafka timestamp, milliseconds since the epoch.
    pub timestamp: Option<i64>,
}

/// The producer of one model's predictions and feedback.
#[derive(Clone)]
pub struct Predictions {
    producer: FutureProducer,
    pipeline: Arc<str>,
}

impl Predictions {
    pub fn new(
        pipeline: &str,
        bootstrap_servers: &str,
        properties: &BTreeMap<String, String>,
    ) -> Result<Self, KafkaError> {
        let defaults = [
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("linger.ms", "5"),
            ("compression.type", "lz4"),
        ];
        Ok(Self {
            producer: super::producer(bootstrap_servers, &defaults, properties)?,
            pipeline: Arc::from(pipeline),
        })
    }

    /// Produces every record and returns once all are acknowledged.
    pub async fn deliver(&self, records: &[Record]) {
        let mut todo: Vec<&Record> = records.iter().collect();
        let mut backoff = Duration::from_millis(100);
        loop {
            let sends = todo.iter().map(|r| {
                let mut record = FutureRecord::<[u8], [u8]>::to(&r.topic)
                    .key(&r.key)
                    .payload(&r.payload)
                    .headers(r.headers.clone());
                if let Some(ts) = r.timestamp {
                    record = record.timestamp(ts);
                }
                self.producer.send(record, Timeout::Never)
            });
            let results = futures::future::join_all(sends).await;
            let mut failed = Vec::new();
            for (r, result) in todo.iter().zip(results) {
                if let Err((error, _)) = result {
                    failed.push((*r, error));
                }
            }
            if failed.is_empty() {
                return;
            }
            warn!(error = %failed[0].1, failed = failed.len(), topic = %failed[0].0.topic,
                  "Predictions not delivered; retrying.");
            metrics::counter!("sluice_prediction_retries_total",
                "pipeline" => self.pipeline.to_string())
            .increment(failed.len() as u64);
            todo = failed.into_iter().map(|(r, _)| r).collect();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}
