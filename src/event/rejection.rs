//! Why an event was rejected, by which stage, and what its dead letter carries.

use std::sync::Arc;

use thiserror::Error;

/// A reason to reject one event. Each variant has a stable short code ([`DecodeError::reason`])
/// used as the `sluice.reason` dead-letter header and the `reason` metric label.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum DecodeError {
    /// The payload is missing (a tombstone) or has no bytes.
    #[error("empty payload")]
    Empty,
    /// The payload is larger than `errors.max_event_size`.
    #[error("payload of {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// The payload is not valid UTF-8.
    #[error("payload is not UTF-8: invalid byte at offset {at}")]
    NotUtf8 { at: usize },
    /// Objects and arrays nest deeper than `errors.max_depth`.
    #[error("JSON nests deeper than the limit of {limit} levels")]
    TooDeep { limit: usize },
    /// The JSON ends before it is complete.
    #[error("truncated JSON: {detail}")]
    Truncated { detail: String },
    /// The payload is not JSON.
    #[error("invalid JSON: {detail}")]
    InvalidJson { detail: String },
    /// The JSON is valid but not an object.
    #[error("expected a JSON object, got {found}")]
    NotObject { found: &'static str },
    /// A required field is absent or null.
    #[error("field `{field}` is required")]
    Missing { field: String },
    /// A field has the wrong JSON type.
    #[error("field `{field}`: expected {expected}, got {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    /// A number outside `minimum`/`maximum`, or a string outside `minLength`/`maxLength`.
    #[error("field `{field}`: {detail}")]
    OutOfRange { field: String, detail: String },
    /// A value not listed in the field's `enum`.
    #[error("field `{field}`: {value} is not one of the allowed values")]
    NotInEnum { field: String, value: String },
    /// A `date-time` or `date` string that does not parse.
    #[error("field `{field}`: {value:?} is not a valid {expected}")]
    BadTimestamp {
        field: String,
        value: String,
        expected: &'static str,
    },
    /// A field not in the schema, where the schema says `additionalProperties: false`.
    #[error("field `{field}` is not in the schema")]
    UnexpectedField { field: String },
    /// A Kafka header whose name is not UTF-8 (the dead letter carries it with the invalid
    /// bytes replaced by U+FFFD).
    #[error("header name {name:?} is not UTF-8")]
    BadHeader { name: String },
}

impl DecodeError {
    /// Stable short code for headers and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooLarge { .. } => "too_large",
            Self::NotUtf8 { .. } => "not_utf8",
            Self::TooDeep { .. } => "too_deep",
            Self::Truncated { .. } => "truncated_json",
            Self::InvalidJson { .. } => "invalid_json",
            Self::NotObject { .. } => "not_object",
            Self::Missing { .. } => "missing_field",
            Self::WrongType { .. } => "wrong_type",
            Self::OutOfRange { .. } => "out_of_range",
            Self::NotInEnum { .. } => "not_in_enum",
            Self::BadTimestamp { .. } => "bad_timestamp",
            Self::UnexpectedField { .. } => "unexpected_field",
            Self::BadHeader { .. } => "bad_header",
        }
    }
}

/// Why an event was not scored. [`InferenceError::reason`] is the `sluice.reason` header.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum InferenceError {
    #[error("input column `{column}` is null and the input has no `null` value")]
    NullInput { column: String },
    #[error("the model raised an error: {0}")]
    Raised(String),
    #[error("the model returned shape {got:?}, expected {expected}")]
    WrongShape { got: Vec<i64>, expected: String },
    #[error("the model returned {value}")]
    NonFinite { value: f32 },
}

impl InferenceError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NullInput { .. } => "null_input",
            Self::Raised(_) => "model_error",
            Self::WrongShape { .. } => "wrong_output_shape",
            Self::NonFinite { .. } => "non_finite_output",
        }
    }
}

/// Why an event was rejected, and by which stage. The stage also says which outputs lack
/// it: `decode` (none has it), `inference` (no prediction), `redis` (its features were not
/// written; Parquet and the models have it).
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    Decode(DecodeError),
    Inference {
        model: Arc<str>,
        error: InferenceError,
    },
    /// Redis refused this entity's write for good (a key of another type, a script error on
    /// its stored data).
    Redis {
        /// Stable short code: `wrong_type`, `script_error`, `refused`.
        reason: &'static str,
        /// The server's error.
        error: String,
    },
    /// The label join cannot use this record ([`crate::sink::join`]).
    Join {
        /// Stable short code: `duplicate_label`, `late_label`, `unknown_event`,
        /// `not_feedback`, `no_label`.
        reason: &'static str,
        /// What happened, for people.
        error: String,
    },
}

impl Failure {
    /// The stage that rejected the event: `decode`, `inference`, `redis` or `join`.
    pub fn stage(&self) -> &'static str {
        match self {
            Self::Decode(_) => "decode",
            Self::Inference { .. } => "inference",
            Self::Redis { .. } => "redis",
            Self::Join { .. } => "join",
        }
    }

    /// Stable short code (the `sluice.reason` header).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Decode(e) => e.reason(),
            Self::Inference { error, .. } => error.reason(),
            Self::Redis { reason, .. } | Self::Join { reason, .. } => reason,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Decode(e) => e.fmt(f),
            Self::Inference { model, error } => write!(f, "model {model}: {error}"),
            Self::Redis { error, .. } => write!(f, "redis: {error}"),
            Self::Join { error, .. } => write!(f, "join: {error}"),
        }
    }
}

/// An event that failed to decode, with everything the dead-letter topic needs.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Kafka message timestamp, milliseconds since the epoch.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The original headers, in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub error: Failure,
}
