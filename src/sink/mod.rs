//! Where batches go. Each sink makes data durable on its own schedule and says so; the
//! pipeline ([`crate::pipeline`]) turns that into committed offsets.
//!
//! - [`parquet`]: exactly-once files, finished per partition; their manifests record how far
//!   each partition is durable, which is also where a partition resumes after a crash.
//! - [`redis`]: the online feature store, replay-safe per entity.
//! - [`dead_letter`]: rejected events to a Kafka topic, at least once.
//! - [`predictions`]: model outputs and feedback records to Kafka, at least once.

use std::collections::BTreeMap;

use rdkafka::{config::ClientConfig, error::KafkaError, producer::FutureProducer};

pub mod dead_letter;
pub mod parquet;
pub mod predictions;
pub mod redis;

/// A producer with sluice's `defaults`, then the user's `properties`, then the source's
/// bootstrap servers (which the properties may not override).
fn producer(
    bootstrap_servers: &str,
    defaults: &[(&str, &str)],
    properties: &BTreeMap<String, String>,
) -> Result<FutureProducer, KafkaError> {
    let mut config = ClientConfig::new();
    for (k, v) in defaults {
        config.set(*k, *v);
    }
    for (k, v) in properties {
        config.set(k, v);
    }
    config.set("bootstrap.servers", bootstrap_servers);
    config.create()
}
