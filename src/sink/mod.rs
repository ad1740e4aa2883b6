//! Where batches go. Each sink makes data durable on its own schedule and says so; the
//! pipeline ([`crate::pipeline`]) turns that into committed offsets.
//!
//! Two kinds of sinks, with two contracts:
//!
//! - **Sinks of rows** implement [`Sink`]: the runner hands them every batch's valid rows, in
//!   the order the pipeline declares them, and asks each how far a partition is durable, when
//!   a partition's data is due to be made durable, where a newly assigned partition resumes,
//!   and to discard what a partition revoked behind its back left unfinished.
//!   - [`redis`]: the online feature store, replay-safe per entity; durable once written.
//!   - [`parquet`]: exactly-once files, finished per partition; their manifests record how
//!     far each partition is durable, which is also where a partition resumes after a crash.
//!   - [`join`]: a model's feedback joined with its labels (state in Redis) into training
//!     examples, produced before the write returns.
//! - **Producers of records** (at least once) hand back one future per record or batch; the
//!   runner holds the records' offsets until the broker acknowledges them:
//!   - [`dead_letter`]: rejected events to a Kafka topic;
//!   - [`predictions`]: model outputs and feedback records (driven by [`crate::score`]).

use std::{collections::BTreeMap, time::Duration};

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::event::{Failure, Originals, TopicPartition};

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
pub mod join;
pub mod parquet;
pub mod predictions;
pub mod redis;

/// Why a partition's data is being made durable now (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roll {
    Size,
    Age,
    Idle,
    /// The segment has `max_open_files` files and the next rows need another.
    OpenFiles,
    Revoke,
    Shutdown,
}

impl Roll {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Size => "size",
            Self::Age => "age",
            Self::Idle => "idle",
            Self::OpenFiles => "open_files",
            Self::Revoke => "revoke",
            Self::Shutdown => "shutdown",
        }
    }
}

/// A row that a sink refused for good: its event becomes a dead letter with this failure,
/// and the other sinks still have it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The row of the batch.
    pub row: usize,
    pub failure: Failure,
}

/// Why a sink could not go on: the pipeline fails, and nothing past the failure is committed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Shutdown came during the write: nothing of the batch is known to be durable.
    #[error("shutdown interrupted a write")]
    Cancelled,
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

impl SinkError {
    pub fn failed(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Failed(Box::new(error))
    }
}

/// The contract between a sink of rows and the runner, which commits a partition's offset
/// only once every sink has made the rows below it durable.
///
/// Every method but `write` has a default for a sink whose writes are durable once
/// acknowledged and which keeps no position of its own (Redis).
#[async_trait]
pub trait Sink: Send {
    /// The sink's name in logs and errors.
    fn name(&self) -> &'static str;

    /// Writes a batch's valid rows (with their `_topic`, `_partition`, `_offset`), with the
    /// original records when the pipeline keeps them (for a sink that stores some). Returns
    /// the rows refused for good; transient failures are the sink's to retry, and `cancel`
    /// ends a retry at shutdown.
    async fn write(
        &mut self,
        rows: &RecordBatch,
        originals: Option<&Originals>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Refusal>, SinkError>;

    /// Whether models take inputs from this sink's [`Self::enrichment`]: the runner then
    /// writes the batch to it before the batch is scored.
    fn enriches(&self) -> bool {
        false
    }

    /// Columns computed for the rows of the last `write` for the models to take as inputs
    /// (features read back at each row's point in time), by name.
    fn enrichment(&mut self) -> Vec<(String, arrow::array::ArrayRef)> {
        Vec::new()
    }

    /// The first offset of `tp` written but not durable yet: nothing at or after it may be
    /// committed.
    fn not_durable_from(&self, _tp: &TopicPartition) -> Option<i64> {
        None
    }

    /// Partitions whose data should be made durable now, and why.
    fn due(&self) -> Vec<(TopicPartition, Roll)> {
        Vec::new()
    }

    /// Partitions holding data that is not durable yet.
    fn holding(&self) -> Vec<TopicPartition> {
        Vec::new()
    }

    /// Makes everything written for `tp` durable. The runner calls it only once every record
    /// produced for those rows (dead letters, predictions) is acknowledged, since a durable
    /// position may be where the partition resumes.
    async fn make_durable(&mut self, _tp: &TopicPartition, _why: Roll) -> Result<(), SinkError> {
        Ok(())
    }

    /// A partition was assigned whose committed offset is `committed`: recover the sink's
    /// records of it and say where it resumes by them (`None`: no opinion).
    async fn recover(
        &mut self,
        _tp: &TopicPartition,
        _committed: Option<i64>,
    ) -> Result<Option<i64>, SinkError> {
        Ok(None)
    }

    /// A failure of the work the sink does in the background (the runner asks every tick).
    fn background_failure(&mut self) -> Option<SinkError> {
        None
    }

    /// Drops what was written for `tp` and is not durable: the partition was released without
    /// the runner's answer, and another member may be writing the same offsets.
    fn discard(&mut self, _tp: &TopicPartition) -> Result<(), SinkError> {
        Ok(())
    }
}

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
