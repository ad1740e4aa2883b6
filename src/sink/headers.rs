//! Names of the headers sluice puts on the records it produces (dead letters, predictions,
//! feedback): part of the documented contract with their readers.
//!
//! The names are stable: consumers of these topics rely on them.

pub const TOPIC: &str = "sluice.topic";
pub const PARTITION: &str = "sluice.partition";
pub const OFFSET: &str = "sluice.offset";
/// Kafka timestamp of the original message, milliseconds since the epoch (empty if none).
pub const TIMESTAMP: &str = "sluice.timestamp";
pub const PIPELINE: &str = "sluice.pipeline";
/// The stage that rejected the event (`decode`, `inference` or `redis`).
pub const STAGE: &str = "sluice.stage";
/// Stable short code, e.g. `missing_field`.
pub const REASON: &str = "sluice.reason";
/// Human-readable error.
pub const ERROR: &str = "sluice.error";
/// `true` when the payload was cut to fit the topic; absent otherwise.
pub const TRUNCATED: &str = "sluice.truncated";
/// With `sluice.truncated`: the original payload's size in bytes.
pub const ORIGINAL_SIZE: &str = "sluice.original_size";
/// On predictions and feedback records: the model's name and the version that scored.
pub const MODEL: &str = "sluice.model";
pub const MODEL_VERSION: &str = "sluice.model_version";
