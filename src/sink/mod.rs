//! Where batches go. Each sink makes data durable on its own schedule and says so; the
//! pipeline ([`crate::pipeline`]) turns that into committed offsets.
//!
//! - [`parquet`]: exactly-once files, finished per partition; their manifests record how far
//!   each partition is durable, which is also where a partition resumes after a crash.
//! - [`redis`]: the online feature store, replay-safe per entity.
//! - [`dead_letter`]: rejected events to a Kafka topic, at least once.
//! - [`predictions`]: model outputs and feedback records to Kafka, at least once.

pub mod dead_letter;
pub mod parquet;
pub mod predictions;
pub mod redis;
