//! Why an event was rejected.

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
