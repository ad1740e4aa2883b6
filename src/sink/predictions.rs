//! Predictions and feedback records to Kafka.
//!
//! An idempotent producer (`acks=all`, `enable.idempotence=true`) keeps each partition's
//! records in order through the client's own retries; a record that still fails for a
//! transient reason is sent again with backoff ([`crate::failure::retry`]) until it is
//! acknowledged. Any other failure (a missing topic, a refused authorization, a record the
//! broker will never take, a fatal idempotence error) fails the pipeline: nothing past the
//! batch is committed. A batch counts as delivered only when every one of its records is
//! acknowledged.

use std::{collections::BTreeMap, sync::Arc, sync::Mutex};

use rdkafka::{
    error::KafkaError,
    message::OwnedHeaders,
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::failure::{self, GaveUp, Retrying};

/// A prediction or feedback record that cannot be delivered.
#[derive(Debug, Error)]
#[error("cannot produce to {topic:?}: {source}")]
pub struct PredictionError {
    pub topic: String,
    #[source]
    pub source: KafkaError,
}

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
        // A prediction waits at most 1 ms for others to share its produce request: at
        // moderate load that is milliseconds off the latency from consumption to a delivered
        // prediction; at full load requests fill up while earlier ones are in flight anyway.
        let defaults = [
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("linger.ms", "1"),
            ("compression.type", "lz4"),
        ];
        Ok(Self {
            producer: super::producer(bootstrap_servers, &defaults, properties)?,
            pipeline: Arc::from(pipeline),
        })
    }

    /// Checks, at start, that `topic` exists (or that the broker creates it) and may be
    /// written to.
    pub async fn check_topic(&self, topic: &str) -> Result<(), super::TopicError> {
        super::check_topic(&self.producer, topic).await
    }

    /// Produces every record and returns once all are acknowledged.
    pub async fn deliver(&self, records: &[Record]) -> Result<(), PredictionError> {
        let who = Retrying {
            pipeline: &self.pipeline,
            metric: "sluice_prediction_retries_total",
            what: "Prediction delivery",
            healthy: None,
        };
        // The records not yet acknowledged, and which topic the last failure was on.
        let todo = Mutex::new((records.iter().collect::<Vec<&Record>>(), None::<Arc<str>>));
        let sent = failure::retry(&who, &CancellationToken::new(), failure::kafka, || async {
            let batch = std::mem::take(&mut todo.lock().expect("not poisoned").0);
            let sends = batch.iter().map(|r| {
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
            let mut first = None;
            let mut state = todo.lock().expect("not poisoned");
            for (r, result) in batch.iter().zip(results) {
                if let Err((error, _)) = result {
                    state.0.push(r);
                    if first.is_none() {
                        state.1 = Some(r.topic.clone());
                        first = Some(error);
                    }
                }
            }
            first.map_or(Ok(()), Err)
        })
        .await;
        match sent {
            Ok(()) => Ok(()),
            Err(GaveUp::Cancelled) => unreachable!("never cancelled"),
            Err(GaveUp::Failed(_, source)) => Err(PredictionError {
                topic: todo
                    .into_inner()
                    .expect("not poisoned")
                    .1
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
                source,
            }),
        }
    }
}
