//! Where batches go. Each sink makes data durable on its own schedule and says so; the
//! pipeline ([`crate::pipeline`]) turns that into committed offsets.
//!
//! - [`parquet`]: exactly-once files, finished per partition; their manifests record how far
//!   each partition is durable, which is also where a partition resumes after a crash.
//! - [`redis`]: the online feature store, replay-safe per entity.
//! - [`dead_letter`]: rejected events to a Kafka topic, at least once.
//! - [`predictions`]: model outputs and feedback records to Kafka, at least once.

use std::{collections::BTreeMap, time::Duration};

use rdkafka::{
    config::ClientConfig,
    error::KafkaError,
    producer::{FutureProducer, Producer},
    types::RDKafkaErrorCode,
};
use thiserror::Error;
use tracing::warn;

pub mod dead_letter;
pub mod headers;
pub mod parquet;
pub mod predictions;
pub mod redis;

/// A producer with sluice's `defaults`, then the user's `properties`, then the source's
/// bootstrap servers (which the properties may not override).
///
/// sluice never creates topics by producing to them (`allow.auto.create.topics=false`, which
/// the properties may turn back on): a dead-letter or output topic that nobody created is found
/// at start ([`check_topic`]) instead of appearing with the broker's default partitions,
/// retention and size limit.
fn producer(
    bootstrap_servers: &str,
    defaults: &[(&str, &str)],
    properties: &BTreeMap<String, String>,
) -> Result<FutureProducer, KafkaError> {
    let mut config = ClientConfig::new();
    config.set("allow.auto.create.topics", "false");
    for (k, v) in defaults {
        config.set(*k, *v);
    }
    for (k, v) in properties {
        config.set(k, v);
    }
    config.set("bootstrap.servers", bootstrap_servers);
    config.create()
}

/// A topic sluice must write to cannot be written to: found at start, before anything is
/// consumed.
#[derive(Debug, Error)]
pub enum TopicError {
    #[error(
        "topic {topic:?} does not exist and the broker does not create it: create it, or \
             fix the pipeline's topic name"
    )]
    Missing { topic: String },
    #[error(
        "topic {topic:?}: the broker refuses it ({code}); check sluice's credentials and \
             ACLs"
    )]
    Refused {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// Asks the broker, through `producer`, about `topic`: an error if it does not exist (and is
/// not created on demand) or may not be written to. When the broker cannot be reached at all,
/// the check is skipped with a warning: that is a transient condition, which delivery retries.
pub(crate) async fn check_topic(producer: &FutureProducer, topic: &str) -> Result<(), TopicError> {
    let producer = producer.clone();
    let name = topic.to_owned();
    let answer = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&name), Duration::from_secs(10))
            .map(|md| md.topics().first().and_then(|t| t.error()))
    })
    .await
    .expect("the metadata task does not panic");
    match answer {
        Ok(None) => Ok(()),
        Ok(Some(err)) => {
            let code = RDKafkaErrorCode::from(err);
            match code {
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                    Err(TopicError::Missing {
                        topic: topic.to_owned(),
                    })
                }
                RDKafkaErrorCode::LeaderNotAvailable => Ok(()),
                code => Err(TopicError::Refused {
                    topic: topic.to_owned(),
                    code,
                }),
            }
        }
        Err(error) => {
            warn!(%error, topic, "Cannot check that the topic exists; going on.");
            Ok(())
        }
    }
}
