//! One failure model for every stage.
//!
//! Every error from outside the process (the broker, Redis, the file system) is classified
//! once, here, into one of three [`Class`]es, and the stages act on the class, never on the
//! error itself:
//!
//! - **transient**: the service is down, slow or moving (a broker restart, a leader election,
//!   Redis loading its data). The same request may succeed later: it is retried with capped,
//!   jittered backoff ([`Backoff`], [`retry`]); meanwhile `/readyz` answers 503, the retries are
//!   counted, and a `WARN` line names the cause.
//! - **per-record**: this one record can never be accepted (larger than the broker takes, a
//!   Redis key that holds another type). It becomes a dead letter with its stage and reason and
//!   the rest of the batch goes on.
//! - **fatal**: nothing will succeed until an operator acts (credentials, permissions, a topic
//!   that does not exist). The pipeline fails, and the process exits non-zero with one `ERROR`
//!   line naming the cause and the remedy.

use std::{
    fmt,
    future::Future,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use rdkafka::{error::KafkaError, types::RDKafkaErrorCode};
use redis::{ErrorKind, RedisError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What an error means for the work that met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Retry with backoff; the same request may succeed later.
    Transient,
    /// This record can never succeed; dead-letter it and go on.
    PerRecord,
    /// Nothing will succeed until an operator acts; fail the pipeline.
    Fatal,
}

/// The class of a Kafka client error (producing, committing, reading metadata).
pub fn kafka(error: &KafkaError) -> Class {
    use RDKafkaErrorCode as C;
    match error {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => Class::Fatal,
        _ => match error.rdkafka_error_code() {
            Some(
                C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::BadMessage
                | C::PolicyViolation,
            ) => Class::PerRecord,
            Some(
                C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::InvalidTopic
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::GroupAuthorizationFailed
                | C::TransactionalIdAuthorizationFailed
                | C::SaslAuthenticationFailed
                | C::Authentication
                | C::Fatal
                | C::OutOfOrderSequenceNumber
                | C::InvalidProducerEpoch
                | C::InvalidArgument,
            ) => Class::Fatal,
            _ => Class::Transient,
        },
    }
}

/// The class of a Redis error. A reply that is an error for one command (the connection works)
/// is about that command's key unless the server says it is busy or moving; an error without a
/// reply (I/O, a cluster without a node for the slot) is about the connection.
pub fn redis(error: &RedisError) -> Class {
    use redis::ServerErrorKind as S;
    match error.kind() {
        ErrorKind::AuthenticationFailed
        | ErrorKind::InvalidClientConfig
        | ErrorKind::Server(S::NoPerm) => Class::Fatal,
        ErrorKind::Server(
            S::BusyLoading
            | S::TryAgain
            | S::ClusterDown
            | S::MasterDown
            | S::ReadOnly
            | S::NoScript
            | S::Moved
            | S::Ask,
        ) => Class::Transient,
        // "ERR unknown command": a server too old for what the configuration asks.
        ErrorKind::Server(S::ResponseError)
            if error
                .detail()
                .is_some_and(|d| d.contains("unknown command")) =>
        {
            Class::Fatal
        }
        // A script error (a stored `_ts` that is not a number), a cross-slot or aborted command.
        ErrorKind::Server(_) => Class::PerRecord,
        ErrorKind::Extension => match error.code() {
            Some("NOAUTH" | "WRONGPASS") => Class::Fatal,
            Some("OOM" | "BUSY") => Class::Transient,
            // WRONGTYPE: the key holds another type; only this entity's write can never succeed.
            _ => Class::PerRecord,
        },
        // The reply was not what sluice's own script returns: a bug, not a condition to wait out.
        ErrorKind::UnexpectedReturnType | ErrorKind::Parse => Class::Fatal,
        _ => Class::Transient,
    }
}

/// Capped exponential backoff with jitter: 100 ms, 200 ms, … up to 10 s, each ±20%.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            next: first,
            max,
            attempts: 0,
        }
    }

    /// How long to wait before the next attempt.
    pub fn delay(&mut self) -> Duration {
        use rand::Rng;
        self.attempts += 1;
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(rand::rng().random_range(0.8..1.2))
    }

    /// Failed attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// Why [`retry`] gave up.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// Shutdown came first.
    Cancelled,
    /// The error is not transient: per-record or fatal, as classified.
    Failed(Class, E),
}

/// Who retries, for logs, metrics and readiness.
pub struct Retrying<'a> {
    /// The pipeline, the `pipeline` label.
    pub pipeline: &'a str,
    /// The metric that counts retries, e.g. `sluice_redis_retries_total`.
    pub metric: &'static str,
    /// What is being done, for the log line: "Redis write", "Dead letter delivery".
    pub what: &'static str,
    /// Cleared while retrying (readiness answers 503), set again on success.
    pub healthy: Option<&'a AtomicBool>,
}

/// Runs `attempt` until it succeeds, retrying transient errors with [`Backoff`]; returns
/// per-record and fatal errors to the caller, which knows what they mean for its records.
pub async fn retry<T, E, F, Fut>(
    who: &Retrying<'_>,
    cancel: &CancellationToken,
    classify: impl Fn(&E) -> Class,
    mut attempt: F,
) -> Result<T, GaveUp<E>>
where
    E: fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::default();
    loop {
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(GaveUp::Cancelled),
            r = attempt() => r,
        };
        match result {
            Ok(value) => {
                if backoff.attempts() > 0 {
                    info!(
                        pipeline = who.pipeline,
                        attempts = backoff.attempts() + 1,
                        "{} succeeds again.",
                        who.what
                    );
                }
                if let Some(h) = who.healthy {
                    h.store(true, Ordering::Release);
                }
                return Ok(value);
            }
            Err(error) => {
                let class = classify(&error);
                if class != Class::Transient {
                    return Err(GaveUp::Failed(class, error));
                }
                if let Some(h) = who.healthy {
                    h.store(false, Ordering::Release);
                }
                metrics::counter!(who.metric, "pipeline" => who.pipeline.to_owned()).increment(1);
                let delay = backoff.delay();
                let n = backoff.attempts();
                if n == 1 || n.is_multiple_of(10) {
                    warn!(pipeline = who.pipeline, %error, attempt = n, retry_in = ?delay,
                          "{} failed; retrying.", who.what);
                }
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(GaveUp::Cancelled),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_errors_are_classified() {
        let produce = |c| KafkaError::MessageProduction(c);
        assert_eq!(
            kafka(&produce(RDKafkaErrorCode::MessageSizeTooLarge)),
            Class::PerRecord
        );
        assert_eq!(
            kafka(&produce(RDKafkaErrorCode::UnknownTopicOrPartition)),
            Class::Fatal
        );
        assert_eq!(
            kafka(&produce(RDKafkaErrorCode::TopicAuthorizationFailed)),
            Class::Fatal
        );
        assert_eq!(
            kafka(&produce(RDKafkaErrorCode::MessageTimedOut)),
            Class::Transient
        );
        assert_eq!(
            kafka(&produce(RDKafkaErrorCode::AllBrokersDown)),
            Class::Transient
        );
        assert_eq!(
            kafka(&produce(RDKafkaErrorCode::NotEnoughReplicas)),
            Class::Transient
        );
    }

    #[test]
    fn redis_errors_are_classified() {
        let ext = |code: &str| redis::make_extension_error(code.into(), None);
        assert_eq!(redis(&ext("WRONGTYPE")), Class::PerRecord);
        assert_eq!(redis(&ext("NOAUTH")), Class::Fatal);
        assert_eq!(redis(&ext("OOM")), Class::Transient);
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(redis(&io), Class::Transient);
        let auth = RedisError::from((ErrorKind::AuthenticationFailed, "bad password"));
        assert_eq!(redis(&auth), Class::Fatal);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<u128> = (0..5).map(|_| b.delay().as_millis()).collect();
        for (d, base) in delays.iter().zip([100, 200, 400, 400, 400]) {
            assert!((base * 8 / 10..=base * 12 / 10).contains(d), "{delays:?}");
        }
        assert_eq!(b.attempts(), 5);
    }
}
