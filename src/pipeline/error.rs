//! Why a pipeline stopped: one type for every cause, with the exit code it means.

use std::time::Duration;

use rdkafka::error::KafkaError;
use thiserror::Error;

use crate::{
    score::{OpenError, ScoreError},
    sink::{
        dead_letter::DeadLetterError, join::JoinError, parquet::ParquetSinkError,
        redis::RedisSinkError, SinkError, TopicError,
    },
};

/// A pipeline's failure. Each variant names its cause; the messages say the remedy where
/// there is one (the causes' own messages, which `{:#}` prints after these).
#[derive(Debug, Error)]
pub enum PipelineError {
    #[error(transparent)]
    Redis(#[from] RedisSinkError),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error("opening {location}")]
    Parquet {
        location: String,
        #[source]
        source: Box<ParquetSinkError>,
    },
    #[error("creating the {what}")]
    Kafka {
        what: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Model(#[from] OpenError),
    #[error("sink {sink}")]
    Sink {
        sink: &'static str,
        #[source]
        source: SinkError,
    },
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    #[error(transparent)]
    Scoring(#[from] ScoreError),
    #[error(
        "event {topic}/{partition}@{offset} rejected at stage {stage} ({reason}) and \
         errors.policy is \"fail\""
    )]
    Rejected {
        topic: String,
        partition: i32,
        offset: i64,
        stage: &'static str,
        reason: String,
    },
    #[error(
        "event {topic}/{partition}@{offset} was refused by {sink} and its original bytes are gone"
    )]
    OriginalGone {
        topic: String,
        partition: i32,
        offset: i64,
        sink: &'static str,
    },
    #[error("the Kafka source thread stopped unexpectedly")]
    SourceExited,
    #[error("the Kafka source stopped")]
    SourceClosed,
    #[error(
        "shutdown took longer than the grace period of {0:?}; uncommitted data will be \
         consumed again"
    )]
    Grace(Duration),
    #[error("the final commit failed")]
    FinalCommit(#[source] KafkaError),
    #[error("selecting the rows of owned partitions")]
    Arrow(#[from] arrow::error::ArrowError),
}

impl PipelineError {
    /// The process's exit code for this failure: 2 for a configuration the process cannot
    /// run with (a model that no version of can serve, one model declared twice), 1 for the
    /// rest (`sluice validate` catches the other configuration errors before a start).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Model(e) if e.is_config() => 2,
            _ => 1,
        }
    }

    pub(super) fn sink(sink: &'static str) -> impl FnOnce(SinkError) -> Self {
        move |source| Self::Sink { sink, source }
    }
}

#[cfg(test)]
#[test]
fn exit_codes_follow_the_kind_of_failure() {
    use crate::score::service::ServiceError;
    let conflict = PipelineError::Model(OpenError::Service(ServiceError::Conflict {
        model: "m".into(),
        what: "path",
    }));
    assert_eq!(conflict.exit_code(), 2);
    let internal = PipelineError::Model(OpenError::Service(ServiceError::Internal {
        model: "m".into(),
        reason: "gone".into(),
    }));
    assert_eq!(internal.exit_code(), 1);
    assert_eq!(PipelineError::SourceExited.exit_code(), 1);
    assert_eq!(PipelineError::Grace(Duration::from_secs(20)).exit_code(), 1);
}
